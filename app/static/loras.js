// DreamOmni2 web page: the LoRA picker. Lists the LoRAs the deployment registered (GET v1/service's
// `loras`), lets the user stack up to `max_loras_per_job` of them with a scale each, and gives app.js
// the job's `loras` field. Its own file: app.js holds the rest of the page.
'use strict';

window.DreamOmni2Loras = (() => {
  const $ = (id) => document.getElementById(id);
  const picker = { info: null, chosen: [] }; // chosen: [{name, scale}] in the order they stack

  function describe(lora) {
    return `${lora.name} (default scale ${lora.scale}; ${lora.tasks.join(', ')})`;
  }

  /** Show the registered LoRAs of `info` (GET v1/service); the fieldset is hidden when there are none. */
  function render(info) {
    picker.info = info;
    const loras = info.loras || [];
    const max = info.max_loras_per_job || 0;
    $('loras-field').hidden = !loras.length || !max;
    const names = new Set(loras.map((lora) => lora.name));
    picker.chosen = picker.chosen.filter((lora) => names.has(lora.name)).slice(0, max);
    const select = $('lora-name');
    const selected = select.value;
    select.replaceChildren(...loras.map((lora) => new Option(describe(lora), lora.name)));
    if (names.has(selected)) select.value = selected;
    const scale = $('lora-scale');
    scale.min = String(info.min_lora_scale);
    scale.max = String(info.max_lora_scale);
    $('lora-help').textContent =
      `Stack up to ${max} on the adapter DreamOmni2 picks, each at a scale from ${info.min_lora_scale} ` +
      `to ${info.max_lora_scale} (empty: its default; 0 is the same as leaving it out).`;
    onSelect();
    renderChosen();
  }

  function lookup(name) {
    return (picker.info.loras || []).find((lora) => lora.name === name);
  }

  function onSelect() {
    const lora = picker.info && lookup($('lora-name').value);
    $('lora-scale').placeholder = lora ? `${lora.scale} (default)` : '';
  }

  /** The scale typed for the selected LoRA, or an error message for the form (nothing is sent). */
  function typedScale() {
    const input = $('lora-scale');
    const text = input.value.trim();
    if (input.validity.badInput) return { error: 'The LoRA scale is not a number.' };
    if (text === '') return { scale: null };
    const value = Number(text);
    const { min_lora_scale: min, max_lora_scale: max } = picker.info;
    if (!Number.isFinite(value) || value < min || value > max) {
      return { error: `A LoRA's scale must be a number from ${min} to ${max}; got ${text}.` };
    }
    return { scale: value };
  }

  /** Add the selected LoRA at the typed scale; returns a refusal ({code, message, details}) or null. */
  function add() {
    const name = $('lora-name').value;
    const max = picker.info.max_loras_per_job;
    if (!name) return null;
    if (picker.chosen.length >= max) {
      return { code: 'too_many_loras', message: `At most ${max} LoRAs may run in one job here.` };
    }
    if (picker.chosen.some((lora) => lora.name === name)) {
      return { code: 'duplicate_lora', message: `${name} is already stacked; remove it to change its scale.` };
    }
    const typed = typedScale();
    if (typed.error) return { code: 'invalid_lora_scale', message: `${typed.error} Nothing was added.` };
    picker.chosen.push({ name, scale: typed.scale === null ? lookup(name).scale : typed.scale });
    $('lora-scale').value = '';
    renderChosen();
    return null;
  }

  function renderChosen() {
    const list = $('lora-chosen');
    list.replaceChildren(
      ...picker.chosen.map((lora, index) => {
        const item = document.createElement('li');
        const text = document.createElement('span');
        text.textContent = `${lora.name} at ${lora.scale}`;
        const remove = document.createElement('button');
        remove.type = 'button';
        remove.className = 'tool';
        remove.textContent = 'Remove';
        remove.setAttribute('aria-label', `Remove LoRA ${lora.name}`);
        remove.dataset.index = String(index);
        item.append(text, remove);
        return item;
      }),
    );
    const full = picker.info && picker.chosen.length >= picker.info.max_loras_per_job;
    $('lora-add').disabled = Boolean(full);
    $('lora-count').textContent = picker.info
      ? `${picker.chosen.length} of at most ${picker.info.max_loras_per_job} stacked.`
      : '';
  }

  function onRemove(event) {
    const button = event.target.closest('button[data-index]');
    if (!button) return;
    picker.chosen.splice(Number(button.dataset.index), 1);
    renderChosen();
    $('lora-name').focus(); // the removed button is gone: keep the keyboard user in the picker
  }

  /** The job's `loras` field (JSON text, as the multipart form takes it), or null for none. */
  function field() {
    if ($('loras-field').hidden || !picker.chosen.length) return null;
    return JSON.stringify(picker.chosen);
  }

  /** Wire the picker's controls; `onRefusal(error)` shows a refusal as the page shows the others. */
  function setUp(onRefusal) {
    $('lora-name').addEventListener('change', onSelect);
    $('lora-add').addEventListener('click', () => {
      const refused = add();
      if (refused) onRefusal(refused);
    });
    // Enter in the scale adds the LoRA instead of submitting the whole form.
    $('lora-scale').addEventListener('keydown', (event) => {
      if (event.key !== 'Enter') return;
      event.preventDefault();
      $('lora-add').click();
    });
    $('lora-chosen').addEventListener('click', onRemove);
  }

  return { render, setUp, field };
})();
