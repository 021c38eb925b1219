// DreamOmni2 web page: the input images. Picking them (file chooser or drop), their thumbnails in
// order (image 1, the one an edit changes, first), reordering and removing them with the keyboard
// or by dragging. The list itself is `state.images` (shared.js), which the form sends.
'use strict';

window.DreamOmni2Images = (() => {
  const { $, state, MIXING, effectiveTask, formatBytes, clearErrors } = window.DreamOmni2Shared;

  function addFiles(files) {
    for (const file of files) {
      state.images.push({ id: state.nextImageId++, file, url: URL.createObjectURL(file) });
    }
    renderImages();
  }

  /** Put `file` first (image 1); with `replace`, in place of the image 1 there was. */
  function putFirst(file, replace) {
    const image = { id: state.nextImageId++, file, url: URL.createObjectURL(file) };
    if (state.images.length && replace) URL.revokeObjectURL(state.images.shift().url);
    state.images.unshift(image);
  }

  /** Show the images in order; `focus` ({id, action}) puts the focus back on the image a button moved. */
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

  /** Wire the picker: the file chooser, the thumbnails' buttons, and drag and drop. */
  function setUp() {
    setUpDragAndDrop();
    $('file-input').addEventListener('change', (event) => {
      addFiles(event.target.files);
      event.target.value = ''; // picking the same file again adds it again
      clearErrors();
    });
    $('thumbs').addEventListener('click', onThumbClick);
  }

  return { render: renderImages, putFirst, setUp };
})();
