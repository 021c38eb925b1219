// DreamOmni2 web page: what a job made. The preview while it runs, then its result: one image, a
// Feature Mixing pair side by side, or several images, each with its download, and the details and
// stage timings of the job. The shown images are `state.result`, `state.pairTarget` and `state.gallery`.
'use strict';

window.DreamOmni2Results = (() => {
  const { $, state, MIXING, jobLabel, formatBytes, extensionOf, errorBlock } = window.DreamOmni2Shared;
  const { api } = window.DreamOmni2Api;

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
  const MIX_BLOCKS = {
    all: 'all blocks',
    double: 'the double-stream blocks',
    single: 'the single-stream blocks',
    none: 'no blocks',
  };

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

  /** Fetch a succeeded job's images and show them with its details. */
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

  return { renderPreview, showResult };
})();
