// DreamOmni2 web page: what its scripts share. The page's state (one object, read and written by the
// other scripts), the job statuses that end a job, and small helpers several of them use. Loaded
// first: every other script of the page reads `window.DreamOmni2Shared` as it starts.
'use strict';

window.DreamOmni2Shared = (() => {
  const TERMINAL = new Set(['succeeded', 'failed', 'canceled']);
  const MIXING = 'feature_mixing';

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
  };

  function chosenTask() {
    return document.querySelector('input[name="task"]:checked').value;
  }

  /** The task the service runs: automatic is an edit with images, else a generation. */
  function effectiveTask() {
    return chosenTask() || (state.images.length ? 'edit' : 'generate');
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

  function extensionOf(job) {
    return job.output_format === 'jpeg' ? 'jpg' : job.output_format;
  }

  /** Hide the form's error and unmark the inputs and images it marked. */
  function clearErrors() {
    $('form-error').hidden = true;
    $('form-error').replaceChildren();
    for (const element of document.querySelectorAll('[aria-invalid="true"]')) element.removeAttribute('aria-invalid');
    for (const element of document.querySelectorAll('.thumb.invalid')) element.classList.remove('invalid', 'over-limit');
  }

  /** Show an error (an ApiError, or the error of a job) in `element`: its message and its code. */
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

  return {
    TERMINAL,
    MIXING,
    $,
    state,
    chosenTask,
    effectiveTask,
    jobLabel,
    formatBytes,
    extensionOf,
    clearErrors,
    errorBlock,
  };
})();
