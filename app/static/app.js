// DreamOmni2 web page: the REST API of this same origin, driven from a form. Vanilla JS, no libraries.
// This file holds the form (what the deployment allows, the chosen task, submitting a job, running
// it again) and starts the page; the other scripts, loaded before it, hold the rest: shared.js (the
// shared state), api.js (the API, its event stream, the notices), images.js (the input images),
// results.js (what a job made), history.js (the recent jobs), job.js (following a job) and
// loras.js (the LoRA picker).
'use strict';

(() => {
  const { $, state, MIXING, chosenTask, effectiveTask, extensionOf, clearErrors, errorBlock } =
    window.DreamOmni2Shared;
  const { ApiError, api, setProblem, checkReadiness, loadKey, saveKey } = window.DreamOmni2Api;
  const { render: renderImages, putFirst, setUp: setUpImages } = window.DreamOmni2Images;
  const { save: saveHistory, remember: rememberJob, render: renderHistory, refresh: refreshHistory } =
    window.DreamOmni2History;
  const { showJob, follow, cancel: cancelJob, open: openJob } = window.DreamOmni2Job;

  const STEP_CACHES = {
    none: 'None (exact)',
    first_block: 'First block (adaptive)',
    taylorseer: 'TaylorSeer (schedule)',
  };
  // Feature Mixing's fractions: [input id, form field, label]; each from 0 to 1, empty for the default 1.
  const MIX_FRACTIONS = [
    ['mix-steps', 'mix_steps', 'Mixed steps'],
    ['mix-strength', 'mix_strength', 'Mix strength'],
  ];
  // Which input an error code is about, so that it can be marked and focused.
  const FIELD_OF_CODE = {
    empty_instruction: 'instruction',
    instruction_too_long: 'instruction',
    invalid_steps: 'steps',
    invalid_guidance: 'guidance',
    invalid_seed: 'seed',
    invalid_num_images: 'num-images',
    invalid_width: 'width',
    invalid_height: 'height',
    invalid_size: 'width',
    size_with_edit: 'width',
    step_cache_not_allowed: 'step-cache',
    missing_api_key: 'api-key',
    invalid_api_key: 'api-key',
    too_many_images: 'file-input',
    edit_needs_image: 'file-input',
    invalid_mix_steps: 'mix-steps',
    invalid_mix_strength: 'mix-strength',
    unknown_lora: 'lora-name',
    lora_not_for_task: 'lora-name',
    duplicate_lora: 'lora-name',
    too_many_loras: 'lora-name',
    invalid_lora_scale: 'lora-scale',
  };
  const ADVANCED_FIELDS = new Set(['steps', 'guidance', 'seed', 'num-images', 'width', 'height', 'step-cache']);

  async function loadService() {
    try {
      const info = await (await api('v1/service')).json();
      setProblem('info', null);
      applyInfo(info);
      refreshHistory();
    } catch (error) {
      if (error.code !== 'unreachable') {
        setProblem('info', `The service did not say what it accepts: ${error.message}`);
      }
      setTimeout(loadService, 3000);
    }
  }

  function applyInfo(info) {
    state.info = info;
    $('key-panel').hidden = !info.auth_required && !$('api-key').value;
    setNumberField('steps', info.min_steps, info.max_steps, info.default_steps);
    setNumberField('num-images', 1, info.max_num_images || 1, 1);
    setNumberField('guidance', info.min_guidance, info.max_guidance, info.default_guidance);
    setNumberField('width', info.min_size, info.max_size, info.default_size);
    setNumberField('height', info.min_size, info.max_size, info.default_size);
    const format = $('output-format');
    const chosen = format.value || 'png';
    format.replaceChildren(...info.output_formats.map((value) => new Option(value.toUpperCase(), value)));
    format.value = info.output_formats.includes(chosen) ? chosen : info.output_formats[0];
    // `none` is always there; the choice is shown only when the deployment offers a cache.
    const caches = $('step-cache');
    caches.replaceChildren(...info.step_caches.map((value) => new Option(STEP_CACHES[value] || value, value)));
    caches.value = info.default_step_cache;
    $('step-cache-field').hidden = info.step_caches.length < 2;
    window.DreamOmni2Loras.render(info);
    renderImages();
    renderInstructionCount();
  }

  function setNumberField(id, min, max, value) {
    const input = $(id);
    input.min = String(min);
    input.max = String(max);
    input.placeholder = `${value} (default)`;
    input.setAttribute('aria-description', `From ${min} to ${max}; empty: ${value}.`);
  }

  /** Feature Mixing takes two prompts and no images or instruction: show the fields of the chosen task. */
  function renderMode() {
    const mixing = chosenTask() === MIXING;
    $('images-field').hidden = mixing;
    $('instruction-field').hidden = mixing;
    $('mixing-field').hidden = !mixing;
    $('translate-field').hidden = mixing;
    // A pair is one job's two images: several images are for edits and generations.
    $('num-images-field').hidden = mixing;
    // Both branches share every attention layer, so a step cache (which skips them apart) does not apply.
    $('step-cache').disabled = mixing;
    $('step-cache-mixing').hidden = !mixing;
    $('step-cache-help').hidden = mixing;
    const skip = $('skip');
    skip.href = mixing ? '#source-prompt' : '#instruction';
    skip.textContent = mixing ? 'Skip to the prompts' : 'Skip to the instruction';
    renderImages();
  }

  function renderInstructionCount() {
    const length = $('instruction').value.trim().length;
    const max = state.info ? state.info.max_instruction_chars : null;
    const counter = $('instruction-count');
    if (max === null) {
      counter.textContent = `${length} characters`;
      return;
    }
    const over = length > max;
    counter.textContent = over
      ? `${length} of at most ${max} characters: ${length - max} too many.`
      : `${length} of at most ${max} characters.`;
    counter.classList.toggle('over', over);
  }

  // Submitting --------------------------------------------------------------------------------------------
  function collectSubmission() {
    const task = chosenTask();
    const mixing = task === MIXING;
    const fields = {};
    if (mixing) {
      fields.task = task;
      fields.source_prompt = $('source-prompt').value;
      fields.target_prompt = $('target-prompt').value;
      const attribute = $('attribute').value.trim();
      if (attribute) fields.attribute = attribute;
      fields.mix_blocks = $('mix-blocks').value;
      for (const [id, name] of MIX_FRACTIONS) {
        const value = $(id).value.trim();
        if (value !== '') fields[name] = value;
      }
    } else {
      fields.instruction = $('instruction').value;
      if (task) fields.task = task;
      // A pair is one job's two images; several images are for edits and generations.
      const count = $('num-images').value.trim();
      if (count !== '') fields.num_images = count;
    }
    for (const name of ['seed', 'steps', 'guidance']) {
      const value = $(name).value.trim();
      if (value !== '') fields[name] = value;
    }
    if (effectiveTask() === 'generate' || mixing) {
      for (const name of ['width', 'height']) {
        const value = $(name).value.trim();
        if (value !== '') fields[name] = value;
      }
    }
    if (!mixing) fields.translate = $('translate').checked ? 'true' : 'false';
    if ($('output-format').value) fields.output_format = $('output-format').value;
    if (!mixing && !$('step-cache-field').hidden && $('step-cache').value) {
      fields.step_cache = $('step-cache').value;
    }
    const loras = window.DreamOmni2Loras.field();
    if (loras) fields.loras = loras;
    return { files: mixing ? [] : state.images.map((image) => image.file), fields };
  }

  /**
   * Feature Mixing's fractions are checked here too, so that an out-of-range one is marked at once;
   * the service checks them again (and everything else). The refusal, or null.
   */
  function checkMixingFractions() {
    if (chosenTask() !== MIXING) return null;
    for (const [id, name, label] of MIX_FRACTIONS) {
      const input = $(id);
      const text = input.value.trim();
      const value = Number(text);
      // A number input holds '' for text it cannot read as a number; badInput tells it from empty.
      if (input.validity.badInput || (text !== '' && !(Number.isFinite(value) && value >= 0 && value <= 1))) {
        const got = input.validity.badInput ? 'not a number' : `got ${text}`;
        return new ApiError(
          0,
          `invalid_${name}`,
          `${label} must be a number from 0 to 1 (empty: 1); ${got}. Nothing was sent.`,
          { field: name },
        );
      }
    }
    return null;
  }

  async function submit(submission) {
    clearErrors();
    const body = new FormData();
    submission.files.forEach((file, index) => body.append('images', file, file.name || `image-${index + 1}`));
    for (const [name, value] of Object.entries(submission.fields)) body.append(name, value);
    const button = $('submit');
    button.disabled = true;
    button.textContent = 'Submitting…';
    try {
      const job = await (await api('v1/jobs', { method: 'POST', body })).json();
      state.submissions.set(job.id, submission);
      rememberJob(job);
      showJob(job);
      $('job-title').focus();
      follow(job);
    } catch (error) {
      showFormError(error);
    } finally {
      button.disabled = false;
      button.textContent = 'Run';
    }
  }

  function showFormError(error) {
    errorBlock($('form-error'), error);
    if (error.code === 'missing_api_key' || error.code === 'invalid_api_key') $('key-panel').hidden = false;
    const image = error.details && /^image (\d+)$/.exec(error.details.image || '');
    if (image) {
      const item = $('thumbs').children[Number(image[1]) - 1];
      if (item) item.classList.add('invalid', 'over-limit');
    }
    const detailField = error.details && typeof error.details.field === 'string' ? error.details.field : null;
    const id = FIELD_OF_CODE[error.code] || (detailField && $(detailField.replace('_', '-')) ? detailField.replace('_', '-') : null);
    if (!id || !$(id)) return;
    const field = $(id);
    if (ADVANCED_FIELDS.has(id)) $('advanced').open = true;
    field.setAttribute('aria-invalid', 'true');
    field.focus();
  }

  // Running a job again, or editing its result -------------------------------------------------------------
  function rerun() {
    const job = state.job;
    const submission = job && state.submissions.get(job.id);
    if (!submission) return;
    $('seed').value = String(job.seed);
    submit({ files: submission.files, fields: { ...submission.fields, seed: String(job.seed) } });
  }

  function reuseResult() {
    const job = state.job;
    if (!state.result || !job || state.result.jobId !== job.id) return;
    const extension = extensionOf(job);
    const file = new File([state.result.blob], `result-${job.id}.${extension}`, { type: state.result.blob.type });
    // The result takes the place of the image it was made from; the references stay.
    putFirst(file, job.task === 'edit');
    document.querySelector('input[name="task"][value="edit"]').checked = true;
    $('seed').value = '';
    renderMode();
    clearErrors();
    const instruction = $('instruction');
    instruction.focus();
    instruction.select();
  }

  // Wiring ------------------------------------------------------------------------------------------------
  function start() {
    loadKey();
    renderHistory();
    renderMode();
    renderInstructionCount();
    setUpImages();

    $('instruction').addEventListener('input', () => {
      renderInstructionCount();
      $('instruction').removeAttribute('aria-invalid');
    });
    for (const id of ['instruction', 'source-prompt', 'target-prompt']) {
      $(id).addEventListener('keydown', (event) => {
        if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
          event.preventDefault();
          $('job-form').requestSubmit();
        }
      });
    }
    for (const id of ['source-prompt', 'target-prompt', 'attribute', 'mix-steps', 'mix-strength']) {
      $(id).addEventListener('input', () => $(id).removeAttribute('aria-invalid'));
    }
    for (const radio of document.querySelectorAll('input[name="task"]')) {
      radio.addEventListener('change', () => {
        renderMode();
        clearErrors();
      });
    }
    $('api-key').addEventListener('input', () => {
      saveKey();
      $('api-key').removeAttribute('aria-invalid');
    });
    $('api-key').addEventListener('change', refreshHistory);
    $('remember-key').addEventListener('change', saveKey);
    $('toggle-key').addEventListener('click', () => {
      const input = $('api-key');
      const show = input.type === 'password';
      input.type = show ? 'text' : 'password';
      $('toggle-key').textContent = show ? 'Hide' : 'Show';
      $('toggle-key').setAttribute('aria-pressed', String(show));
    });
    $('job-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const refused = checkMixingFractions();
      if (refused) {
        clearErrors();
        showFormError(refused);
        return;
      }
      submit(collectSubmission());
    });
    $('cancel').addEventListener('click', cancelJob);
    $('rerun').addEventListener('click', rerun);
    $('reuse').addEventListener('click', reuseResult);
    $('history').addEventListener('click', (event) => {
      const button = event.target.closest('button[data-open]');
      if (button) openJob(button.dataset.open);
    });
    $('clear-history').addEventListener('click', () => {
      saveHistory([]);
      $('file-input').focus();
    });
    $('notice-retry').addEventListener('click', () => {
      checkReadiness();
      if (!state.info) loadService();
    });

    window.DreamOmni2Loras.setUp((refusal) => {
      clearErrors();
      showFormError(new ApiError(0, refusal.code, refusal.message, refusal.details));
    });
    loadService();
    checkReadiness();
  }

  start();
})();
