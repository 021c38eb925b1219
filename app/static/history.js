// DreamOmni2 web page: the recent jobs of this browser. A short list kept in local storage (id, what
// the job was about, its last known status), shown with a button to open each, and refreshed from
// the service for the jobs that had not ended when last seen.
'use strict';

window.DreamOmni2History = (() => {
  const { $, TERMINAL, jobLabel } = window.DreamOmni2Shared;
  const { api } = window.DreamOmni2Api;

  const HISTORY_STORAGE = 'dreamomni2.recentJobs';
  const HISTORY_MAX = 20;

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

  return {
    save: saveHistory,
    remember: rememberJob,
    update: updateHistory,
    render: renderHistory,
    refresh: refreshHistory,
  };
})();
