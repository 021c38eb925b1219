// DreamOmni2 web page: following the shown job. Its event stream (and the queue position while it
// waits), its status line, progress bar and stages, then its end: the result, or why it failed.
// Canceling it and opening a job of the recent list are here too. The job is `state.job` (shared.js).
'use strict';

window.DreamOmni2Job = (() => {
  const { $, state, TERMINAL, MIXING, errorBlock } = window.DreamOmni2Shared;
  const { ApiError, api, sleep, streamEvents } = window.DreamOmni2Api;
  const { renderPreview, showResult } = window.DreamOmni2Results;
  const { update: updateHistory } = window.DreamOmni2History;

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

  function stopFollowing() {
    if (state.stream) state.stream.abort();
    state.stream = null;
  }

  /** Follow `job` (the shown one) to its end: its event stream, and its queue position while it waits. */
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

  /** Show `job` in the job panel, in place of the one shown (which is no longer followed). */
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

  /** Ask the service to cancel the shown job; a running one stops at its next step. */
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

  /** Show a job of the recent list, from the service's job object, and follow it if it has not ended. */
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

  return { showJob, follow, cancel: cancelJob, open: openJob };
})();
