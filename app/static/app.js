// DreamOmni2 web page: the REST API of this same origin, driven from a form. Vanilla JS, no libraries.
//
// The API key never goes into an address (addresses land in logs): every call sends it in the
// Authorization header, which is why the event stream is read with fetch() and a small SSE parser
// rather than EventSource (which cannot send headers), and why results are downloaded as blobs.
'use strict';

(() => {
  const KEY_SESSION = 'dreamomni2.apiKey';
  const KEY_REMEMBERED = 'dreamomni2.apiKey.remembered';
  const HISTORY_STORAGE = 'dreamomni2.recentJobs';
  const HISTORY_MAX = 20;
  const TERMINAL = new Set(['succeeded', 'failed', 'canceled']);
  const STAGES = [
    ['translate', 'Translate'],
    ['encode', 'Encode'],
    ['denoise', 'Denoise'],
    ['decode', 'Decode'],
  ];
  const STAGE_VERBS = {
    translate: 'Translating the instruction',
    encode: 'Encoding the prompt',
    denoise: 'Denoising',
    decode: 'Decoding the image',
  };
  const ADAPTERS = {
    base: 'plain FLUX.1 Kontext (no LoRA)',
    edit: 'DreamOmni2 edit LoRA',
    generation: 'DreamOmni2 generation LoRA',
  };
  const FALLBACKS = {
    disabled_by_request: 'translation was turned off for this job',
    disabled_by_deployment: 'this deployment runs without the translator',
    unparseable: "the translator's answer could not be read",
    empty: "the translator's answer was empty",
    truncated: "the translator's answer ran over its token budget",
  };
  const STEP_CACHES = {
    none: 'None (exact)',
    first_block: 'First block (adaptive)',
    taylorseer: 'TaylorSeer (schedule)',
  };
  const MIXING = 'feature_mixing';
  const MIX_BLOCKS = {
    all: 'all blocks',
    double: 'the double-stream blocks',
    single: 'the single-stream blocks',
    none: 'no blocks',
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

  const $ = (id) => document.getElementById(id);

  const state = {
    info: null, // the deployment's limits: GET v1/service
    images: [], // {id, file, url} in order: image 1 first
    nextImageId: 1,
    job: null, // the job object shown
    finished: null, // id of the shown job once its final state is rendered
    seen: null, // the latest progress the shown job reported: {stage, step, total}
    denoised: null, // its latest denoising progress, still shown once decoding starts
    preview: null, // {uri, step, total}: the latest preview of the shown job's image as it forms
    stream: null, // AbortController of the shown job's event stream and polling
    submissions: new Map(), // job id -> what this page sent for it (to run it again)
    result: null, // {jobId, blob, url} of the shown result (a pair's source)
    pairTarget: null, // {blob, url} of the shown pair's target
    gallery: [], // [{blob, url}] of a several-images job's images after the first
    problems: { reach: null, ready: null, workers: null, info: null },
    readyTimer: null,
  };

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details || null;
    }
  }

  // Talking to the service ----------------------------------------------------------------------------
  function authHeaders() {
    const key = $('api-key').value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** fetch(), with a network failure turned into the "unreachable" notice (and cleared on success). */
  async function reach(path, init = {}) {
    try {
      const response = await fetch(path, { cache: 'no-store', ...init });
      setProblem('reach', null);
      return response;
    } catch (error) {
      if (error.name === 'AbortError') throw error;
      setProblem(
        'reach',
        `The service at ${location.origin} cannot be reached. Check the connection; this page keeps trying.`,
      );
      scheduleReadiness(3000);
      throw new ApiError(0, 'unreachable', 'The service cannot be reached; nothing was sent. Try again shortly.');
    }
  }

  /** A call of the API with the caller's key; a non-2xx answer throws the service's own error. */
  async function api(path, { method = 'GET', body, headers = {}, signal } = {}) {
    const response = await reach(path, { method, body, signal, headers: { ...authHeaders(), ...headers } });
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // Not the error envelope (a proxy's page, say): say what is known.
    }
    const error = body && body.error;
    if (error && error.message) return new ApiError(response.status, error.code, error.message, error.details);
    const text = `The service answered ${response.status} ${response.statusText || ''}`.trim();
    return new ApiError(response.status, `http_${response.status}`, `${text}.`);
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }

  /** Server-Sent Events, parsed as the HTML standard says (lines end in CR, LF or CRLF). */
  class SseParser {
    constructor(dispatch) {
      this.dispatch = dispatch;
      this.buffer = '';
      this.reset();
    }

    reset() {
      this.data = [];
      this.type = '';
      this.id = null;
    }

    push(chunk) {
      this.buffer += chunk;
      let position = 0;
      for (;;) {
        const cr = this.buffer.indexOf('\r', position);
        const lf = this.buffer.indexOf('\n', position);
        const end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
        if (end === -1) break;
        let next = end + 1;
        if (this.buffer[end] === '\r') {
          if (end + 1 === this.buffer.length) break; // a LF may follow in the next chunk
          if (this.buffer[end + 1] === '\n') next = end + 2;
        }
        this.line(this.buffer.slice(position, end));
        position = next;
      }
      this.buffer = this.buffer.slice(position);
    }

    line(line) {
      if (line === '') {
        if (this.data.length) this.dispatch({ type: this.type || 'message', data: this.data.join('\n'), id: this.id });
        this.reset();
        return;
      }
      if (line.startsWith(':')) return; // a comment: the server's keep-alive pings
      const colon = line.indexOf(':');
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'data') this.data.push(value);
      else if (field === 'event') this.type = value;
      else if (field === 'id' && !value.includes('\0')) this.id = value;
      else if (field === 'retry' && /^\d+$/.test(value)) this.retry = Number(value);
    }
  }

  /**
   * Follow a job's event stream until its final event (returned). A dropped connection is resumed
   * with Last-Event-ID, so no event is lost or repeated; refusals (401, 404) end it with their error.
   */
  async function streamEvents(jobId, signal, onEvent) {
    let lastEventId = null;
    let delay = 1000;
    for (;;) {
      const headers = { Accept: 'text/event-stream' };
      if (lastEventId) headers['Last-Event-ID'] = lastEventId;
      let response;
      try {
        response = await api(`v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      } catch (error) {
        if (signal.aborted || error.name === 'AbortError') return null;
        if (error.status >= 400 && error.status < 500) throw error;
        await sleep(delay, signal);
        if (signal.aborted) return null;
        continue;
      }
      if (response.status === 204) {
        // The stream had ended already (its final event was seen): the job object says how.
        const job = await (await api(`v1/jobs/${encodeURIComponent(jobId)}`, { signal })).json();
        const event = { type: job.status, data: JSON.stringify(job), id: null };
        if (TERMINAL.has(job.status)) {
          onEvent(event);
          return event;
        }
        await sleep(delay, signal);
        if (signal.aborted) return null;
        continue;
      }
      let final = null;
      const parser = new SseParser((event) => {
        if (event.id) lastEventId = event.id;
        if (final === null && onEvent(event)) final = event;
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      try {
        while (final === null) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(value);
        }
      } catch (error) {
        if (signal.aborted) return null;
        // The connection dropped mid-stream: resume after the last event seen.
      }
      if (parser.retry) delay = parser.retry;
      if (final !== null) {
        reader.cancel().catch(() => {});
        return final;
      }
      if (signal.aborted) return null;
      await sleep(delay, signal);
      if (signal.aborted) return null;
    }
  }

  // Notices: unreachable, not ready, no worker ------------------------------------------------------------
  function setProblem(kind, text) {
    if (state.problems[kind] === text) return;
    state.problems[kind] = text;
    const { reach: unreachable, ready, workers, info } = state.problems;
    const shown = unreachable || ready || info || workers;
    const notice = $('notice');
    if (!shown) {
      notice.hidden = true;
      return;
    }
    if ($('notice-text').textContent !== shown) $('notice-text').textContent = shown;
    notice.hidden = false;
  }

  function setServiceState(text, ok) {
    const element = $('service-state');
    if (element.textContent !== text) element.textContent = text;
    element.classList.toggle('ok', ok === true);
    element.classList.toggle('bad', ok === false);
  }

  function scheduleReadiness(ms) {
    clearTimeout(state.readyTimer);
    state.readyTimer = setTimeout(checkReadiness, ms);
  }

  async function checkReadiness() {
    let next = 15000;
    try {
      // With keys on, the worker counts are shown to a caller with a key only.
      const response = await reach('readyz', { headers: authHeaders() });
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = null;
      }
      if (response.ok && body && body.status === 'ready') {
        setProblem('ready', null);
        if (!body.workers) {
          setServiceState('Ready.', true);
          setProblem('workers', null);
          scheduleReadiness(next);
          return;
        }
        const workers = body.workers;
        const queued = body.queue_depth || 0;
        const plural = workers.ready === 1 ? 'worker' : 'workers';
        setServiceState(`Ready: ${workers.ready} ${plural} ready, ${queued} queued.`, workers.ready > 0);
        setProblem(
          'workers',
          workers.ready > 0 ? null : 'No worker is ready right now: jobs wait in the queue until one starts.',
        );
      } else {
        const why = body && body.redis && body.redis !== 'ok' ? ` (job store: ${body.redis})` : '';
        setProblem(
          'ready',
          `The service is not ready${why}. Jobs cannot be submitted until it is; this page checks again.`,
        );
        setServiceState('Not ready.', false);
        next = 3000;
      }
    } catch {
      setServiceState('Unreachable.', false);
      next = 3000;
    }
    scheduleReadiness(next);
  }

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

  // The API key: in this tab's session storage, or this device's local storage when asked to ------------
  function loadKey() {
    let remembered = null;
    let session = null;
    try {
      remembered = localStorage.getItem(KEY_REMEMBERED);
      session = sessionStorage.getItem(KEY_SESSION);
    } catch {
      // Storage disabled: the key lives in the field only.
    }
    $('api-key').value = remembered || session || '';
    $('remember-key').checked = Boolean(remembered);
    if ($('api-key').value) $('key-panel').hidden = false;
  }

  function saveKey() {
    const key = $('api-key').value.trim();
    try {
      if (key) sessionStorage.setItem(KEY_SESSION, key);
      else sessionStorage.removeItem(KEY_SESSION);
      if (key && $('remember-key').checked) localStorage.setItem(KEY_REMEMBERED, key);
      else localStorage.removeItem(KEY_REMEMBERED);
    } catch {
      // Storage disabled: nothing to keep.
    }
  }

  // Images ------------------------------------------------------------------------------------------------
  function addFiles(files) {
    for (const file of files) {
      state.images.push({ id: state.nextImageId++, file, url: URL.createObjectURL(file) });
    }
    renderImages();
  }

  function chosenTask() {
    return document.querySelector('input[name="task"]:checked').value;
  }

  function effectiveTask() {
    return chosenTask() || (state.images.length ? 'edit' : 'generate');
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

  /** What a job is about, in a line: its instruction, or a pair's two prompts. */
  function jobLabel(job) {
    if (job.instruction) return job.instruction;
    if (job.source_prompt || job.target_prompt) {
      return `Feature Mixing: ${job.source_prompt || '?'} → ${job.target_prompt || '?'}`;
    }
    return '';
  }

  function formatBytes(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function renderImages(focus) {
    const list = $('thumbs');
    const max = state.info ? state.info.max_images : Infinity;
    const editing = effectiveTask() === 'edit';
    list.replaceChildren(
      ...state.images.map((image, index) => {
        const n = index + 1;
        const name = image.file.name || `image ${n}`;
        const item = document.createElement('li');
        item.className = 'thumb';
        item.dataset.id = String(image.id);
        item.draggable = true;
        if (index === 0 && editing) item.classList.add('edit-target');
        if (n > max) item.classList.add('over-limit');
        const preview = document.createElement('img');
        preview.src = image.url;
        preview.alt = `Image ${n}: ${name}`;
        preview.addEventListener('error', () => {
          // Not an image the browser can show; the service will say what is wrong with it.
          const none = document.createElement('div');
          none.className = 'no-preview';
          none.setAttribute('role', 'img');
          none.setAttribute('aria-label', `Image ${n}: ${name} (no preview)`);
          none.textContent = 'No preview';
          preview.replaceWith(none);
        });
        const badge = document.createElement('span');
        badge.className = 'badge';
        badge.textContent = `Image ${n} · ${index === 0 && editing ? 'to edit' : 'reference'}`;
        const label = document.createElement('span');
        label.className = 'name';
        label.textContent = `${name} · ${formatBytes(image.file.size)}`;
        const tools = document.createElement('div');
        tools.className = 'tools';
        tools.append(
          toolButton('earlier', '←', `Move image ${n} (${name}) earlier`, index === 0, image.id),
          toolButton('later', '→', `Move image ${n} (${name}) later`, index === state.images.length - 1, image.id),
          toolButton('remove', 'Remove', `Remove image ${n} (${name})`, false, image.id),
        );
        item.append(preview, badge, label, tools);
        return item;
      }),
    );
    const count = state.images.length;
    const counter = $('image-count');
    counter.textContent = Number.isFinite(max) ? `(${count} of at most ${max})` : `(${count})`;
    counter.classList.toggle('over', count > max);
    const warning = $('images-warning');
    warning.hidden = !(count > max);
    if (count > max) {
      warning.textContent = `${count} images: this service takes at most ${max}. Remove ${count - max} before running.`;
    }
    const sizeAllowed = effectiveTask() === 'generate' || effectiveTask() === MIXING;
    $('width').disabled = !sizeAllowed;
    $('height').disabled = !sizeAllowed;
    if (focus) restoreFocus(focus);
  }

  function toolButton(action, text, label, disabled, id) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'small';
    button.dataset.action = action;
    button.dataset.id = String(id);
    button.textContent = text;
    button.setAttribute('aria-label', label);
    button.disabled = disabled;
    return button;
  }

  function restoreFocus({ id, action }) {
    const item = $('thumbs').querySelector(`li[data-id="${id}"]`);
    if (!item) {
      const first = $('thumbs').querySelector('button:not(:disabled)');
      (first || $('file-input')).focus();
      return;
    }
    const wanted = item.querySelector(`button[data-action="${action}"]`);
    const target = wanted && !wanted.disabled ? wanted : item.querySelector('button:not(:disabled)');
    if (target) target.focus();
  }

  function moveImage(id, offset) {
    const from = state.images.findIndex((image) => image.id === id);
    const to = from + offset;
    if (from < 0 || to < 0 || to >= state.images.length) return;
    const [image] = state.images.splice(from, 1);
    state.images.splice(to, 0, image);
  }

  function removeImage(id) {
    const index = state.images.findIndex((image) => image.id === id);
    if (index < 0) return null;
    const [image] = state.images.splice(index, 1);
    URL.revokeObjectURL(image.url);
    const next = state.images[Math.min(index, state.images.length - 1)];
    return next ? next.id : null;
  }

  function onThumbClick(event) {
    const button = event.target.closest('button[data-action]');
    if (!button) return;
    const id = Number(button.dataset.id);
    const action = button.dataset.action;
    if (action === 'remove') {
      const next = removeImage(id);
      renderImages(next === null ? { id: -1, action } : { id: next, action });
    } else {
      moveImage(id, action === 'earlier' ? -1 : 1);
      renderImages({ id, action });
    }
    clearErrors();
  }

  // Mouse users may also drag a thumbnail onto another to reorder, or drop files anywhere on the images.
  let dragged = null;
  function setUpDragAndDrop() {
    const zone = $('drop-zone');
    const area = zone.closest('fieldset');
    area.addEventListener('dragover', (event) => {
      if (!event.dataTransfer.types.includes('Files')) return;
      event.preventDefault();
      zone.classList.add('dragging');
    });
    area.addEventListener('dragleave', (event) => {
      if (!area.contains(event.relatedTarget)) zone.classList.remove('dragging');
    });
    area.addEventListener('drop', (event) => {
      zone.classList.remove('dragging');
      if (!event.dataTransfer.files.length) return;
      event.preventDefault();
      addFiles(event.dataTransfer.files);
      clearErrors();
    });
    const list = $('thumbs');
    list.addEventListener('dragstart', (event) => {
      const item = event.target.closest('li.thumb');
      if (!item) return;
      dragged = Number(item.dataset.id);
      event.dataTransfer.effectAllowed = 'move';
      event.dataTransfer.setData('text/plain', `image ${dragged}`);
    });
    list.addEventListener('dragover', (event) => {
      if (dragged !== null && event.target.closest('li.thumb')) event.preventDefault();
    });
    list.addEventListener('drop', (event) => {
      const item = event.target.closest('li.thumb');
      if (dragged === null || !item) return;
      event.preventDefault();
      event.stopPropagation();
      const from = state.images.findIndex((image) => image.id === dragged);
      const to = state.images.findIndex((image) => image.id === Number(item.dataset.id));
      if (from >= 0 && to >= 0) moveImage(dragged, to - from);
      dragged = null;
      renderImages();
    });
    list.addEventListener('dragend', () => { dragged = null; });
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

  function clearErrors() {
    $('form-error').hidden = true;
    $('form-error').replaceChildren();
    for (const element of document.querySelectorAll('[aria-invalid="true"]')) element.removeAttribute('aria-invalid');
    for (const element of document.querySelectorAll('.thumb.invalid')) element.classList.remove('invalid', 'over-limit');
  }

  function errorBlock(element, error) {
    const message = document.createElement('p');
    message.className = 'message';
    message.textContent = error.message;
    const code = document.createElement('p');
    code.className = 'code';
    code.textContent = error.status ? `${error.code} (HTTP ${error.status})` : error.code;
    element.replaceChildren(message, code);
    element.hidden = false;
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

  // Following a job ---------------------------------------------------------------------------------------
  function stopFollowing() {
    if (state.stream) state.stream.abort();
    state.stream = null;
  }

  function follow(job) {
    stopFollowing();
    if (TERMINAL.has(job.status)) {
      finish(job);
      return;
    }
    const controller = new AbortController();
    state.stream = controller;
    const onEvent = (event) => handleEvent(job.id, event);
    streamEvents(job.id, controller.signal, onEvent).catch((error) => {
      if (controller.signal.aborted) return;
      errorBlock($('job-error'), error);
    });
    pollWhileQueued(job.id, controller.signal);
  }

  /** The queue moves without events: refresh the position while the job waits. */
  async function pollWhileQueued(jobId, signal) {
    while (!signal.aborted) {
      await sleep(2000, signal);
      if (signal.aborted || !state.job || state.job.id !== jobId || state.job.status !== 'queued') return;
      try {
        const job = await (await api(`v1/jobs/${encodeURIComponent(jobId)}`, { signal })).json();
        if (signal.aborted || state.job.id !== jobId || state.job.status !== 'queued') return;
        if (job.status === 'queued') {
          state.job = job;
          renderStatus();
        }
      } catch {
        // The stream reports what matters; a missed refresh of the position is harmless.
      }
    }
  }

  function parse(data) {
    try {
      return JSON.parse(data);
    } catch {
      return {};
    }
  }

  /** One event of the shown job's stream; true for its final event. */
  function handleEvent(jobId, event) {
    if (!state.job || state.job.id !== jobId) return true;
    const data = parse(event.data);
    if (TERMINAL.has(event.type)) {
      finish(data && data.id ? data : { ...state.job, status: event.type });
      return true;
    }
    const job = { ...state.job };
    if (event.type === 'queued') {
      job.status = 'queued';
      job.queue_position = data.position ?? null;
      job.requeued = data.reason || null;
    } else if (event.type === 'started') {
      job.status = 'running';
      job.queue_position = null;
      job.attempts = data.attempt || job.attempts;
      updateHistory(job);
    } else if (event.type === 'progress') {
      job.status = 'running';
      job.queue_position = null;
      job.progress = { stage: data.stage, step: data.step, total: data.total };
      state.seen = job.progress;
      if (data.preview) state.preview = { uri: data.preview, step: data.step, total: data.total };
    }
    state.job = job;
    renderStatus();
    return false;
  }

  function showJob(job) {
    stopFollowing();
    state.job = job;
    state.finished = null;
    state.seen = job.status === 'running' && job.progress && job.progress.stage ? job.progress : null;
    state.denoised = null;
    state.preview = null;
    $('job').hidden = false;
    $('job-id').textContent = job.id;
    $('job-error').hidden = true;
    $('result').hidden = true;
    const cancel = $('cancel');
    cancel.disabled = false;
    cancel.textContent = 'Cancel';
    renderStatus();
  }

  /** The stages a job goes through: a Feature Mixing pair has no instruction to translate. */
  function stagesOf(job) {
    return job.task === MIXING ? STAGES.filter(([name]) => name !== 'translate') : STAGES;
  }

  function stageIndex(job, stage) {
    return stagesOf(job).findIndex(([name]) => name === stage);
  }

  function renderStatus() {
    const job = state.job;
    const seen = state.seen;
    const current = seen ? stageIndex(job, seen.stage) : -1;
    let text;
    let fraction = 0;
    if (job.status === 'queued') {
      text = job.queue_position ? `Queued: position ${job.queue_position} in the queue.` : 'Queued.';
      if (job.requeued === 'worker_lost') text = `Queued again: its worker was lost. ${text}`;
    } else if (job.status === 'running') {
      if (seen && seen.stage === 'denoise') {
        text = `Running: ${STAGE_VERBS.denoise}, step ${seen.step} of ${seen.total}.`;
      } else if (seen) {
        text = `Running: ${STAGE_VERBS[seen.stage] || seen.stage}.`;
      } else {
        text = 'Running.';
      }
      if (job.cancelRequested) text = `Canceling: it stops at its next step. ${text}`;
    } else if (job.status === 'succeeded') {
      const total = job.timings && job.timings.total;
      text = total ? `Succeeded in ${total.toFixed(2)} s.` : 'Succeeded.';
    } else if (job.status === 'failed') {
      text = 'Failed.';
    } else {
      const message = job.error && job.error.message ? job.error.message : '';
      if (job.cancel_reason === 'deadline') text = 'Canceled: no worker started it before its deadline.';
      else if (!message) text = 'Canceled.';
      else text = message.startsWith('Canceled') ? message : `Canceled: ${message}`;
    }
    if (job.status === 'succeeded') fraction = 1;
    else if (seen) {
      const weights = { translate: [0, 0.05], encode: [0.05, 0.1], denoise: [0.1, 0.95], decode: [0.95, 1] };
      const [from, to] = weights[seen.stage] || [0, 0];
      fraction = from + (to - from) * (seen.total ? seen.step / seen.total : 0);
    }
    const status = $('job-status');
    if (status.textContent !== text) status.textContent = text;
    $('job-progress').value = fraction;
    renderStages(job, current);
    renderPreview(job);
    $('cancel').hidden = TERMINAL.has(job.status);
  }

  /** The latest preview while the job runs (its progress events carry one every few steps); the
   * result replaces it, and a job that ends otherwise leaves none. */
  function renderPreview(job) {
    const preview = job.status === 'running' ? state.preview : null;
    const figure = $('preview');
    const image = $('preview-image');
    if (!preview) {
      figure.hidden = true;
      image.removeAttribute('src');
      return;
    }
    if (image.getAttribute('src') !== preview.uri) image.setAttribute('src', preview.uri);
    const pair = job.task === MIXING ? ': source and target side by side' : '';
    $('preview-caption').textContent = `Preview at step ${preview.step} of ${preview.total}${pair}`;
    figure.hidden = false;
  }

  function renderStages(job, current) {
    const list = $('stages');
    const stages = stagesOf(job);
    if (list.children.length !== stages.length) {
      list.replaceChildren(...stages.map(() => document.createElement('li')));
    }
    const ended = TERMINAL.has(job.status);
    stages.forEach(([name, label], index) => {
      const item = list.children[index];
      let className = '';
      let text = label;
      if (job.status === 'succeeded' || index < current) className = 'done';
      else if (index === current) className = ended ? 'stopped' : 'active';
      if (name === 'denoise' && state.seen && (current > index || (current === index && state.seen.total))) {
        // Only what the stream (or the job object) reported: never a count assumed from the settings.
        const steps = current === index ? state.seen : state.denoised;
        if (steps) text = `${label}: step ${steps.step} of ${steps.total}`;
      }
      if (item.className !== className) item.className = className;
      if (item.textContent !== text) item.textContent = text;
      const status = className === 'done' ? 'done' : className === 'active' ? 'in progress' : className || 'to do';
      item.setAttribute('aria-label', `${text}: ${status}`);
    });
    if (state.seen && state.seen.stage === 'denoise') state.denoised = state.seen;
  }

  async function finish(job) {
    if (state.finished === job.id) return;
    state.finished = job.id;
    stopFollowing();
    state.job = job;
    renderStatus();
    updateHistory(job);
    if (job.status === 'failed' || (job.status === 'canceled' && job.cancel_reason !== 'requested')) {
      const error = job.error || { code: job.status, message: `The job ${job.status}.` };
      errorBlock($('job-error'), new ApiError(0, error.code, error.message, error.details));
    }
    if (job.status === 'succeeded') await showResult(job);
  }

  function isPair(job) {
    return job.task === MIXING;
  }

  /** How many images a finished job has: a pair's two, else one per `results` entry. */
  function resultCount(job) {
    return isPair(job) ? 2 : Math.max(1, (job.results || []).length);
  }

  async function fetchResult(jobId, index) {
    const query = index === null ? '' : `?index=${index}`;
    return (await api(`v1/jobs/${encodeURIComponent(jobId)}/result${query}`)).blob();
  }

  function releaseResults() {
    if (state.result) URL.revokeObjectURL(state.result.url);
    if (state.pairTarget) URL.revokeObjectURL(state.pairTarget.url);
    for (const image of state.gallery) URL.revokeObjectURL(image.url);
    state.result = null;
    state.pairTarget = null;
    state.gallery = [];
  }

  async function showResult(job) {
    const pair = isPair(job);
    const count = resultCount(job);
    const several = !pair && count > 1;
    let blobs;
    try {
      const indexes = count > 1 ? [...Array(count).keys()] : [null];
      blobs = await Promise.all(indexes.map((index) => fetchResult(job.id, index)));
    } catch (error) {
      errorBlock($('job-error'), error);
      return;
    }
    if (!state.job || state.job.id !== job.id) return;
    releaseResults();
    state.result = { jobId: job.id, blob: blobs[0], url: URL.createObjectURL(blobs[0]) };
    if (pair) state.pairTarget = { blob: blobs[1], url: URL.createObjectURL(blobs[1]) };
    if (several) state.gallery = blobs.slice(1).map((blob) => ({ blob, url: URL.createObjectURL(blob) }));
    $('result-single').hidden = pair || several;
    $('download').hidden = pair || several;
    $('result-pair').hidden = !pair;
    $('result-gallery').hidden = !several;
    $('reuse').hidden = pair || several;
    if (pair) renderPair(job);
    else if (several) renderGallery(job);
    else renderSingle(job);
    $('rerun').hidden = !state.submissions.has(job.id);
    $('rerun').textContent = `Run again with seed ${job.seed}`;
    renderDetails(job);
    $('result').hidden = false;
  }

  function extensionOf(job) {
    return job.output_format === 'jpeg' ? 'jpg' : job.output_format;
  }

  function describeResult(info) {
    return info && info.width ? `${info.width} × ${info.height} ${info.content_type}, ${formatBytes(info.bytes)}` : '';
  }

  function renderSingle(job) {
    $('result-image').src = state.result.url;
    $('result-image').alt = `The result of job ${job.id}: ${jobLabel(job)}`;
    $('result-caption').textContent = describeResult(job.result);
    const download = $('download');
    download.href = state.result.url;
    download.download = `dreamomni2-${job.id}.${extensionOf(job)}`;
    download.setAttribute('aria-label', `Download the result of job ${job.id}`);
  }

  /** A Feature Mixing pair side by side: the source (index 0) and the target that took its attribute. */
  function renderPair(job) {
    const shown = [
      ['source', job.source_prompt, state.result],
      ['target', job.target_prompt, state.pairTarget],
    ];
    shown.forEach(([role, prompt, image], index) => {
      const info = (job.results || [])[index] || (index === 0 ? job.result : null);
      $(`${role}-image`).src = image.url;
      $(`${role}-image`).alt = `The ${role} image of job ${job.id}: ${prompt || ''}`;
      $(`${role}-caption`).textContent = [prompt, describeResult(info)].filter(Boolean).join(' · ');
      const download = $(`download-${role}`);
      download.href = image.url;
      download.download = `dreamomni2-${job.id}-${role}.${extensionOf(job)}`;
      download.setAttribute('aria-label', `Download the ${role} image of job ${job.id}`);
    });
  }

  /** A several-images job: each image with its seed and its own download (index i: seed + i). */
  function renderGallery(job) {
    const images = [state.result, ...state.gallery];
    const figures = images.map((image, index) => {
      const info = (job.results || [])[index] || {};
      const seed = info.seed != null ? info.seed : job.seed + index;
      const figure = document.createElement('figure');
      const img = document.createElement('img');
      img.src = image.url;
      img.alt = `Image ${index + 1} of ${images.length} of job ${job.id} (seed ${seed}): ${jobLabel(job)}`;
      const caption = document.createElement('figcaption');
      const title = document.createElement('strong');
      title.textContent = `Image ${index + 1} · seed ${seed}`;
      const detail = document.createElement('span');
      detail.className = 'help';
      detail.textContent = describeResult(info);
      caption.append(title, detail);
      const download = document.createElement('a');
      download.className = 'button primary';
      download.href = image.url;
      download.download = `dreamomni2-${job.id}-${index}.${extensionOf(job)}`;
      download.textContent = `Download image ${index + 1}`;
      download.setAttribute('aria-label', `Download image ${index + 1} of job ${job.id}`);
      figure.append(img, caption, download);
      return figure;
    });
    $('result-gallery').replaceChildren(...figures);
  }

  function mixingSummary(job) {
    const mixing = job.mixing || {};
    const parts = [MIX_BLOCKS[mixing.blocks] || mixing.blocks || 'all blocks'];
    if (mixing.step_fraction != null) {
      const mixed = mixing.mixed_steps != null ? ` (${mixing.mixed_steps} of ${job.steps})` : '';
      parts.push(`${Math.round(mixing.step_fraction * 100)}% of the steps${mixed}`);
    }
    if (mixing.strength != null) parts.push(`strength ${mixing.strength}`);
    return parts.join(', ');
  }

  function renderDetails(job) {
    const translation = job.translated
      ? "the translator's rewrite was used"
      : `the instruction was used as is: ${FALLBACKS[job.fallback_reason] || job.fallback_reason || 'no reason given'}`;
    const described = job.task === MIXING
      ? [
        ['Source prompt', job.source_prompt],
        ['Target prompt', job.target_prompt],
        ['Attribute', job.attribute || '—'],
        ['Mixing', mixingSummary(job)],
        ['Adapter', `${ADAPTERS[job.adapter] || job.adapter} (${job.adapter})`],
        ['Task', `${job.task}, a pair: source and target`],
      ]
      : [
        ['Instruction', job.instruction],
        ['Prompt', job.prompt || '—'],
        ['Translation', translation],
        ['Adapter', `${ADAPTERS[job.adapter] || job.adapter} (${job.adapter})`],
        ['Task', `${job.task}, ${job.image_count} image${job.image_count === 1 ? '' : 's'}`],
      ];
    const rows = [
      ...described,
      ['Seed', String(job.seed)],
      ['Steps', job.transformer_evaluations != null && job.transformer_evaluations !== job.steps
        ? `${job.steps} (${job.transformer_evaluations} full transformer passes)`
        : String(job.steps)],
      ['Guidance', String(job.guidance)],
    ];
    if (job.task !== MIXING) rows.push(['Step cache', job.step_cache]);
    if (job.speed_profile) rows.push(['Speed profile', job.speed_profile]);
    const list = $('result-details');
    list.replaceChildren();
    for (const [term, value] of rows) {
      const dt = document.createElement('dt');
      dt.textContent = term;
      const dd = document.createElement('dd');
      dd.textContent = value;
      list.append(dt, dd);
    }
    const order = ['translate', 'encode', 'denoise', 'decode', 'total'];
    const timings = Object.entries(job.timings || {}).sort(
      ([a], [b]) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99),
    );
    $('timings').querySelector('tbody').replaceChildren(
      ...timings.map(([stage, seconds]) => {
        const row = document.createElement('tr');
        const name = document.createElement('th');
        name.scope = 'row';
        name.textContent = stage;
        const value = document.createElement('td');
        value.textContent = seconds.toFixed(3);
        row.append(name, value);
        return row;
      }),
    );
  }

  async function cancelJob() {
    const job = state.job;
    if (!job || TERMINAL.has(job.status)) return;
    const button = $('cancel');
    button.disabled = true;
    button.textContent = 'Canceling…';
    try {
      const response = await api(`v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: 'POST' });
      const answer = await response.json();
      if (!state.job || state.job.id !== job.id) return;
      if (response.status === 202) {
        // Running: it stops at its next step, and the stream brings the final event.
        state.job = { ...state.job, cancelRequested: true };
        renderStatus();
      } else {
        finish(answer);
      }
    } catch (error) {
      errorBlock($('job-error'), error);
      button.disabled = false;
      button.textContent = 'Cancel';
    }
  }

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
    const image = { id: state.nextImageId++, file, url: URL.createObjectURL(file) };
    // The result takes the place of the image it was made from; the references stay.
    if (state.images.length && job.task === 'edit') URL.revokeObjectURL(state.images.shift().url);
    state.images.unshift(image);
    document.querySelector('input[name="task"][value="edit"]').checked = true;
    $('seed').value = '';
    renderMode();
    clearErrors();
    const instruction = $('instruction');
    instruction.focus();
    instruction.select();
  }

  // Recent jobs of this browser ---------------------------------------------------------------------------
  function loadHistory() {
    try {
      const entries = JSON.parse(localStorage.getItem(HISTORY_STORAGE) || '[]');
      return Array.isArray(entries) ? entries : [];
    } catch {
      return [];
    }
  }

  function saveHistory(entries) {
    try {
      localStorage.setItem(HISTORY_STORAGE, JSON.stringify(entries.slice(0, HISTORY_MAX)));
    } catch {
      // Storage full or disabled: the list is not kept.
    }
    renderHistory();
  }

  function rememberJob(job) {
    const entry = { id: job.id, instruction: jobLabel(job), status: job.status, created_at: job.created_at };
    saveHistory([entry, ...loadHistory().filter((e) => e.id !== job.id)]);
  }

  function updateHistory(job, status = job.status) {
    const entries = loadHistory();
    const entry = entries.find((e) => e.id === job.id);
    if (!entry || entry.status === status) return;
    entry.status = status;
    saveHistory(entries);
  }

  function renderHistory() {
    const entries = loadHistory();
    $('history-empty').hidden = entries.length > 0;
    $('clear-history').hidden = entries.length === 0;
    $('history').replaceChildren(
      ...entries.map((entry) => {
        const item = document.createElement('li');
        item.dataset.id = entry.id;
        const open = document.createElement('button');
        open.type = 'button';
        open.className = 'small';
        open.dataset.open = entry.id;
        open.textContent = 'Open';
        open.setAttribute('aria-label', `Open job ${entry.id}: ${entry.instruction}`);
        const id = document.createElement('code');
        id.textContent = entry.id;
        const instruction = document.createElement('span');
        instruction.className = 'instruction';
        instruction.textContent = entry.instruction;
        const status = document.createElement('span');
        status.className = `status ${entry.status}`;
        status.textContent = entry.status === 'gone' ? 'expired or not this key’s' : entry.status;
        const when = document.createElement('time');
        when.className = 'help';
        when.dateTime = entry.created_at;
        when.textContent = new Date(entry.created_at).toLocaleString();
        item.append(open, id, instruction, status, when);
        return item;
      }),
    );
  }

  /** Ask the service for the status of the listed jobs that had not ended when last seen. */
  async function refreshHistory() {
    for (const entry of loadHistory()) {
      if (TERMINAL.has(entry.status) || entry.status === 'gone') continue;
      try {
        const job = await (await api(`v1/jobs/${encodeURIComponent(entry.id)}`)).json();
        updateHistory(job);
      } catch (error) {
        if (error.code === 'job_not_found') updateHistory(entry, 'gone');
        if (error.code === 'unreachable' || error.status === 401) return;
      }
    }
  }

  async function openJob(id) {
    try {
      const job = await (await api(`v1/jobs/${encodeURIComponent(id)}`)).json();
      updateHistory(job);
      showJob(job);
      $('job-title').focus();
      follow(job);
    } catch (error) {
      if (error.code === 'job_not_found') updateHistory({ id }, 'gone');
      showJob({ id, status: 'failed', progress: {} });
      errorBlock($('job-error'), error);
      $('cancel').hidden = true;
      $('job-status').textContent = 'This job could not be opened.';
    }
  }

  // Wiring ------------------------------------------------------------------------------------------------
  function start() {
    loadKey();
    renderHistory();
    renderMode();
    renderInstructionCount();
    setUpDragAndDrop();

    $('file-input').addEventListener('change', (event) => {
      addFiles(event.target.files);
      event.target.value = ''; // picking the same file again adds it again
      clearErrors();
    });
    $('thumbs').addEventListener('click', onThumbClick);
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
