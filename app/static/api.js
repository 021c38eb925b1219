// DreamOmni2 web page: the REST API of this same origin. Calls with the caller's key, the job event
// stream, the notices about the service (unreachable, not ready, no worker) and where the key is kept.
//
// The API key never goes into an address (addresses land in logs): every call sends it in the
// Authorization header, which is why the event stream is read with fetch() and a small SSE parser
// rather than EventSource (which cannot send headers), and why results are downloaded as blobs.
'use strict';

window.DreamOmni2Api = (() => {
  const { $, TERMINAL } = window.DreamOmni2Shared;
  const KEY_SESSION = 'dreamomni2.apiKey';
  const KEY_REMEMBERED = 'dreamomni2.apiKey.remembered';
  // The notices' texts by kind (null: none), and the timer of the next readiness check.
  const problems = { reach: null, ready: null, workers: null, info: null };
  let readyTimer = null;

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
    if (problems[kind] === text) return;
    problems[kind] = text;
    const { reach: unreachable, ready, workers, info } = problems;
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
    clearTimeout(readyTimer);
    readyTimer = setTimeout(checkReadiness, ms);
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

  return { ApiError, api, sleep, streamEvents, setProblem, checkReadiness, loadKey, saveKey };
})();
