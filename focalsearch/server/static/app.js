// FocalSearch web page: plain JavaScript talking to the JSON API of `focalsearch serve`.
// No build step and nothing fetched from the internet.
"use strict";

(() => {
  const TOKEN_COOKIE = "focalsearch_token";
  const $ = (id) => document.getElementById(id);

  const els = {
    indexInfo: $("index-info"),
    conditions: $("conditions"),
    searchForm: $("search-form"),
    text: $("query-text"),
    file: $("query-file"),
    k: $("k"),
    modeSearch: $("mode-search"),
    modeCompare: $("mode-compare"),
    summary: $("query-summary"),
    status: $("status"),
    error: $("error"),
    errorText: $("error-text"),
    errorDismiss: $("error-dismiss"),
    resultsView: $("results-view"),
    results: $("results"),
    resultsMessage: $("results-message"),
    more: $("more"),
    compareView: $("compare-view"),
    compare: $("compare"),
    compareMessage: $("compare-message"),
    tokenForm: $("token-form"),
    tokenInput: $("token-input"),
    tokenMessage: $("token-message"),
    dropOverlay: $("drop-overlay"),
    browse: $("browse"),
    collectionView: $("collection-view"),
    collection: $("collection"),
    collectionHint: $("collection-hint"),
    collectionMessage: $("collection-message"),
    collectionPrev: $("collection-prev"),
    collectionNext: $("collection-next"),
    collectionPage: $("collection-page"),
  };

  const state = {
    conditions: [], // as listed by GET /api/conditions
    query: null, // {kind: "text", text} | {kind: "image", image_id, name} | {kind: "file", file, name, key}
    mode: "search",
    offset: 0,
    seq: 0, // bumps on every request; answers to older requests are dropped
    collectionOffset: 0, // the first image of the collection page shown when there is no query
    collectionSeq: 0,
  };
  const COLLECTION_PAGE = 48;
  const files = new Map(); // history keys -> File objects (a File cannot go into history.state reliably)
  let fileCounter = 0;

  // ---------------------------------------------------------------------------------------------
  // API access, with the token form on 401

  class ApiError extends Error {}

  let tokenWait = null; // {promise, resolve} while the token form is waiting for the user
  let tokenSubmitted = false;

  function askForToken(serverMessage) {
    els.tokenMessage.textContent = tokenSubmitted
      ? `That token was not accepted${serverMessage ? ` (${serverMessage})` : ""}. Try again.`
      : "Enter the token that the server was started with (focalsearch serve --token).";
    els.tokenForm.hidden = false;
    els.tokenInput.focus();
    setStatus("Waiting for the access token.");
    if (!tokenWait) {
      let resolve;
      const promise = new Promise((r) => { resolve = r; });
      tokenWait = { promise, resolve };
    }
    return tokenWait.promise;
  }

  els.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = els.tokenInput.value.trim();
    // Cookie values cannot hold spaces, quotes, commas, semicolons or backslashes.
    if (!token || !/^[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+$/.test(token)) {
      els.tokenMessage.textContent = "The token must be printable ASCII without spaces, quotes, commas, semicolons or backslashes.";
      els.tokenInput.focus();
      return;
    }
    document.cookie = `${TOKEN_COOKIE}=${token}; path=/; SameSite=Strict`;
    tokenSubmitted = true;
    els.tokenInput.value = "";
    els.tokenForm.hidden = true;
    setStatus("");
    const wait = tokenWait;
    tokenWait = null;
    if (wait) wait.resolve();
  });

  async function errorText(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      /* not JSON */
    }
    if (body && typeof body.error === "string" && body.error) return body.error;
    if (body && typeof body.detail === "string" && body.detail) return body.detail;
    if (body && Array.isArray(body.detail) && body.detail.length && body.detail[0].msg) {
      return body.detail.map((d) => d.msg).join("; ");
    }
    return `The server answered ${response.status} ${response.statusText || ""}`.trim();
  }

  async function api(path, options = {}) {
    for (;;) {
      let response;
      try {
        response = await fetch(path, { credentials: "same-origin", ...options });
      } catch (err) {
        throw new ApiError(`Cannot reach the server (${err.message}).`);
      }
      if (response.status === 401) {
        await askForToken(await errorText(response));
        continue; // the cookie now carries the token: retry
      }
      if (!response.ok) throw new ApiError(await errorText(response));
      try {
        return await response.json();
      } catch (_) {
        throw new ApiError("The server sent an answer that is not JSON.");
      }
    }
  }

  const postJson = (path, body) =>
    api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

  // ---------------------------------------------------------------------------------------------
  // Messages

  function setStatus(text) {
    els.status.textContent = text;
  }

  function showError(text) {
    els.errorText.textContent = text;
    els.error.hidden = false;
  }

  function hideError() {
    els.error.hidden = true;
    els.errorText.textContent = "";
  }

  els.errorDismiss.addEventListener("click", hideError);

  const label = (instruction) => (instruction === "" ? "(no instruction)" : instruction);
  // A sentence's full stop, unless it already ends in one (an instruction may end with "?").
  const sentence = (text) => (/[.?!…]["”’)]*$/.test(text) ? text : `${text}.`);
  const describeQuery = (q) => (q.kind === "text" ? `“${q.text}”` : q.name || "the image");

  // ---------------------------------------------------------------------------------------------
  // Conditions

  async function loadConditions() {
    setStatus("Loading the index…");
    let data;
    try {
      data = await api("/api/conditions");
    } catch (err) {
      els.conditions.replaceChildren(paragraph("The instructions could not be loaded.", "muted"));
      showError(err.message);
      setStatus("");
      return;
    }
    state.conditions = Array.isArray(data.conditions) ? data.conditions : [];
    const models = [...new Set(state.conditions.map((c) => `${c.model} (${c.encoder})`))];
    const indexName = data.index ? String(data.index).replace(/[\\/]+$/, "").split(/[\\/]/).pop() : "";
    els.indexInfo.textContent = [indexName ? `Index ${indexName}` : "", models.length ? `model ${models.join(", ")}` : ""]
      .filter(Boolean)
      .join(" · ");
    els.indexInfo.title = data.index ? String(data.index) : "";
    renderConditions();
    setStatus(state.conditions.length ? "" : "The index has no instructions yet.");
    showCollection();
  }

  function paragraph(text, className) {
    const p = document.createElement("p");
    p.textContent = text;
    if (className) p.className = className;
    return p;
  }

  function renderConditions() {
    const legend = els.conditions.querySelector("legend");
    const rows = [];
    if (!state.conditions.length) {
      rows.push(paragraph("This index has no instructions. Build some with focalsearch index … -i \"color\".", "muted"));
    }
    let firstAvailable = true;
    state.conditions.forEach((c, i) => {
      const row = document.createElement("div");
      row.className = "condition";
      row.dataset.testid = "condition";
      row.dataset.instruction = c.instruction;

      const use = document.createElement("input");
      use.type = "checkbox";
      use.id = `cond-use-${i}`;
      use.className = "cond-use";
      const name = document.createElement("label");
      name.htmlFor = use.id;
      name.className = "cond-name";
      name.textContent = label(c.instruction);
      if (c.rows != null) name.title = `${c.rows} images · ${c.model} (${c.encoder})`;

      row.append(use, name);
      if (c.damaged) {
        use.disabled = true;
        row.classList.add("damaged");
        row.dataset.damaged = "true";
        const why = document.createElement("span");
        why.className = "cond-damaged";
        why.id = `cond-damaged-${i}`;
        why.textContent = `unavailable: ${c.damaged}`;
        use.setAttribute("aria-describedby", why.id);
        row.append(why);
      } else {
        use.checked = firstAvailable;
        firstAvailable = false;

        const weightLabel = document.createElement("label");
        weightLabel.className = "cond-weight-label";
        const weightText = document.createElement("span");
        weightText.className = "visually-hidden";
        weightText.textContent = `Weight for ${label(c.instruction)}`;
        const weight = document.createElement("input");
        weight.type = "number";
        weight.step = "0.1";
        weight.value = "1";
        weight.className = "cond-weight";
        weight.id = `cond-weight-${i}`;
        weight.inputMode = "decimal";
        weightLabel.append(weightText, weight);

        const notLabel = document.createElement("label");
        notLabel.className = "cond-not-label";
        const not = document.createElement("input");
        not.type = "checkbox";
        not.className = "cond-not";
        not.id = `cond-not-${i}`;
        const notText = document.createElement("span");
        notText.textContent = "not";
        const notHidden = document.createElement("span");
        notHidden.className = "visually-hidden";
        notHidden.textContent = ` the same ${label(c.instruction)}`;
        notLabel.append(not, notText, notHidden);

        row.append(weightLabel, notLabel);
      }
      rows.push(row);
    });
    els.conditions.replaceChildren(...(legend ? [legend] : []), ...rows);
  }

  // [{instruction, weight}] of the ticked, available conditions; throws ApiError on a bad weight.
  function selectedConditions() {
    const out = [];
    els.conditions.querySelectorAll(".condition").forEach((row) => {
      const use = row.querySelector(".cond-use");
      if (!use || use.disabled || !use.checked) return;
      const weightInput = row.querySelector(".cond-weight");
      const raw = weightInput ? weightInput.value.trim() : "1";
      let weight = raw === "" ? 1 : Number(raw);
      if (!Number.isFinite(weight)) throw new ApiError(`The weight for ${label(row.dataset.instruction)} is not a number.`);
      const not = row.querySelector(".cond-not");
      if (not && not.checked) weight = -Math.abs(weight);
      out.push({ instruction: row.dataset.instruction, weight });
    });
    return out;
  }

  let rerunTimer = null;
  function scheduleRerun() {
    if (!state.query) return;
    clearTimeout(rerunTimer);
    rerunTimer = setTimeout(() => run(), 200);
  }
  els.conditions.addEventListener("change", scheduleRerun);

  // ---------------------------------------------------------------------------------------------
  // Queries and history

  function kValue() {
    const k = Math.round(Number(els.k.value));
    return Number.isFinite(k) && k >= 1 ? Math.min(k, 100) : 12;
  }

  function historyState() {
    const q = state.query;
    const query = !q ? null : q.kind === "file" ? { kind: "file", key: q.key, name: q.name } : { ...q };
    return { focalsearch: true, query, mode: state.mode, collection: state.collectionOffset };
  }

  function newQuery(query) {
    state.query = query;
    if (query.kind !== "text") els.text.value = "";
    history.pushState(historyState(), "");
    run();
  }

  window.addEventListener("popstate", (event) => {
    const s = event.state;
    if (!s || !s.focalsearch) return;
    let query = s.query;
    if (query && query.kind === "file") {
      const file = files.get(query.key);
      query = file ? { kind: "file", file, name: query.name, key: query.key } : null;
    }
    setMode(s.mode, { rerun: false });
    state.query = query;
    state.collectionOffset = Number.isInteger(s.collection) && s.collection >= 0 ? s.collection : 0;
    els.text.value = query && query.kind === "text" ? query.text : "";
    if (query) run();
    else {
      renderSummary();
      showCollection();
    }
  });

  els.searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.text.value.trim();
    if (!text) {
      showError("Type what you are looking for, or choose an image.");
      els.text.focus();
      return;
    }
    newQuery({ kind: "text", text });
  });

  function searchByFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name} is not an image.`);
      return;
    }
    const key = `f${++fileCounter}`;
    files.set(key, file);
    newQuery({ kind: "file", file, name: file.name || "pasted image", key });
  }

  els.file.addEventListener("change", () => {
    const file = els.file.files && els.file.files[0];
    els.file.value = "";
    searchByFile(file);
  });

  function searchByImage(imageId, name) {
    newQuery({ kind: "image", image_id: imageId, name });
  }

  els.k.addEventListener("change", () => { if (state.query) run(); });

  // ---------------------------------------------------------------------------------------------
  // Drag and drop, paste

  let dragDepth = 0;
  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");

  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    els.dropOverlay.hidden = false;
  });
  window.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) els.dropOverlay.hidden = true;
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    els.dropOverlay.hidden = true;
    searchByFile(event.dataTransfer.files[0]);
  });
  window.addEventListener("paste", (event) => {
    const items = event.clipboardData ? Array.from(event.clipboardData.files || []) : [];
    const image = items.find((f) => f.type.startsWith("image/"));
    if (image) {
      event.preventDefault();
      searchByFile(image);
    }
  });

  // ---------------------------------------------------------------------------------------------
  // Modes

  function setMode(mode, { rerun = true } = {}) {
    if (mode !== "search" && mode !== "compare") mode = "search";
    const changed = state.mode !== mode;
    state.mode = mode;
    els.modeSearch.setAttribute("aria-pressed", String(mode === "search"));
    els.modeCompare.setAttribute("aria-pressed", String(mode === "compare"));
    showViews();
    if (changed && rerun) {
      history.replaceState(historyState(), "");
      if (state.query) run();
      else showCollection();
    }
  }

  // Without a query the page shows the collection; with one, the results or the comparison.
  function showViews() {
    els.collectionView.hidden = Boolean(state.query);
    els.resultsView.hidden = !state.query || state.mode !== "search";
    els.compareView.hidden = !state.query || state.mode !== "compare";
    els.browse.hidden = !state.query;
  }

  els.modeSearch.addEventListener("click", () => setMode("search"));
  els.modeCompare.addEventListener("click", () => setMode("compare"));

  // ---------------------------------------------------------------------------------------------
  // The collection: every indexed image, a page at a time, shown while there is no query

  els.browse.addEventListener("click", () => {
    state.query = null;
    els.text.value = "";
    history.pushState(historyState(), "");
    hideError();
    renderSummary();
    setStatus("");
    showCollection();
  });

  function showCollection() {
    if (state.query) return;
    showViews();
    els.collectionHint.textContent = state.mode === "compare"
      ? "Click an image to compare it under the ticked instructions (tick 2 to 4), or search above."
      : "Click an image for more like it under the ticked instructions, or search above.";
    loadCollection(state.collectionOffset);
  }

  async function loadCollection(offset) {
    const seq = ++state.collectionSeq;
    const list = els.collection;
    list.dataset.state = "loading";
    list.setAttribute("aria-busy", "true");
    let data;
    try {
      data = await api(`/api/images?offset=${offset}&limit=${COLLECTION_PAGE}`);
    } catch (err) {
      if (seq !== state.collectionSeq) return;
      list.removeAttribute("aria-busy");
      list.replaceChildren();
      els.collectionMessage.textContent = `The collection could not be listed: ${err.message}`;
      els.collectionMessage.classList.add("is-error");
      els.collectionMessage.hidden = false;
      els.collectionPrev.disabled = els.collectionNext.disabled = true;
      els.collectionPage.textContent = "";
      list.dataset.state = "error";
      return;
    }
    if (seq !== state.collectionSeq) return;
    list.removeAttribute("aria-busy");
    const images = Array.isArray(data.images) ? data.images : [];
    const total = Number.isInteger(data.total) ? data.total : images.length;
    if (!images.length && total > 0 && offset > 0) {
      // The index shrank under a page that no longer exists: show its last page instead.
      state.collectionOffset = Math.max(0, Math.floor((total - 1) / COLLECTION_PAGE) * COLLECTION_PAGE);
      if (!state.query) history.replaceState(historyState(), "");
      return loadCollection(state.collectionOffset);
    }
    state.collectionOffset = offset;
    list.replaceChildren(...images.map((r) => collectionCard(r)));
    els.collectionMessage.classList.remove("is-error");
    els.collectionMessage.hidden = images.length > 0;
    els.collectionMessage.textContent = images.length
      ? ""
      : "The index has no images yet. Add some with focalsearch index FOLDER -i \"color\".";
    els.collectionPrev.disabled = offset <= 0;
    els.collectionNext.disabled = offset + images.length >= total;
    els.collectionPage.textContent = images.length
      ? `${offset + 1}–${offset + images.length} of ${total} images`
      : "";
    list.dataset.offset = String(offset);
    list.dataset.total = String(total);
    list.dataset.state = images.length ? "done" : "empty";
    list.dataset.seq = String(Number(list.dataset.seq || "0") + 1);
  }

  function turnCollectionPage(step) {
    state.collectionOffset = Math.max(0, state.collectionOffset + step * COLLECTION_PAGE);
    history.replaceState(historyState(), "");
    loadCollection(state.collectionOffset);
    els.collectionView.scrollIntoView({ block: "start" });
  }
  els.collectionPrev.addEventListener("click", () => turnCollectionPage(-1));
  els.collectionNext.addEventListener("click", () => turnCollectionPage(1));

  // ---------------------------------------------------------------------------------------------
  // Running a query

  function renderSummary() {
    const q = state.query;
    const box = els.summary;
    box.replaceChildren();
    if (!q) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    box.dataset.kind = q.kind;
    if (q.kind === "text") {
      box.append(paragraph(`Text: “${q.text}”`, "summary-text"));
    } else {
      const img = document.createElement("img");
      img.alt = "";
      img.className = "summary-image";
      img.width = 64;
      img.height = 64;
      if (q.kind === "image") {
        img.src = `/api/thumbnails/${encodeURIComponent(q.image_id)}?size=256`;
        box.dataset.imageId = q.image_id;
      } else {
        if (!q.url) q.url = URL.createObjectURL(q.file);
        img.src = q.url;
        delete box.dataset.imageId;
      }
      const text = paragraph(`Images like ${q.name || "this one"}`, "summary-text");
      box.append(img, text);
      if (q.kind === "image") {
        const open = document.createElement("a");
        open.href = `/api/images/${encodeURIComponent(q.image_id)}`;
        open.target = "_blank";
        open.rel = "noopener";
        open.textContent = "Open the full image";
        box.append(open);
      }
    }
  }

  function queryBody(extra) {
    const q = state.query;
    if (q.kind === "file") {
      const form = new FormData();
      form.append("image", q.file, q.file.name || "query.png");
      for (const [key, value] of Object.entries(extra)) {
        form.append(key, typeof value === "string" ? value : JSON.stringify(value));
      }
      return { method: "POST", body: form };
    }
    const body = q.kind === "text" ? { text: q.text, ...extra } : { image_id: q.image_id, ...extra };
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }

  const queryKey = (q) => (q.kind === "text" ? `text:${q.text}` : q.kind === "image" ? `image:${q.image_id}` : `file:${q.name}`);

  // Marks a finished render: what it shows (query, conditions) and a counter, for tests and scripts.
  function markDone(list, stateName, extra = {}) {
    list.dataset.query = state.query ? queryKey(state.query) : "";
    Object.assign(list.dataset, extra);
    list.dataset.state = stateName;
    list.dataset.seq = String(Number(list.dataset.seq || "0") + 1);
  }

  async function run({ append = false } = {}) {
    if (!state.query) return;
    clearTimeout(rerunTimer);
    const seq = ++state.seq;
    hideError();
    showViews();
    renderSummary();
    if (state.mode === "compare") await runCompare(seq);
    else await runSearch(seq, append);
  }

  // POST to the API for the view `element`; on failure show why in the page and return null. A
  // reply to a query that a newer one has replaced (seq moved on) is dropped, also as null.
  async function fetchInto(element, message, seq, path, body, what, marks) {
    let data;
    try {
      data = await api(path, body);
    } catch (err) {
      if (seq !== state.seq) return null;
      element.removeAttribute("aria-busy");
      showError(err.message);
      failList(element, message, `The ${what} failed: ${err.message}`);
      setStatus(`The ${what} failed.`);
      markDone(element, "error", marks);
      return null;
    }
    if (seq !== state.seq) return null;
    element.removeAttribute("aria-busy");
    return data;
  }

  function failList(list, message, text) {
    if (list === els.results) els.more.hidden = true;
    list.replaceChildren();
    message.textContent = text;
    message.classList.add("is-error");
    message.hidden = false;
  }

  async function runSearch(seq, append) {
    const list = els.results;
    const message = els.resultsMessage;
    let conditions;
    try {
      conditions = selectedConditions();
    } catch (err) {
      showError(err.message);
      failList(list, message, err.message);
      markDone(list, "error", { conditions: "" });
      return;
    }
    if (!conditions.length) {
      failList(list, message, "Tick at least one instruction to search under.");
      message.classList.remove("is-error");
      setStatus("No instruction is ticked.");
      markDone(list, "empty", { conditions: "[]" });
      return;
    }
    const k = kValue();
    if (!append) state.offset = 0;
    list.dataset.state = "loading";
    list.setAttribute("aria-busy", "true");
    setStatus(append ? "Loading more…" : `Searching for ${describeQuery(state.query)}…`);
    const data = await fetchInto(list, message, seq, "/api/search", queryBody({ conditions, k, offset: state.offset }),
      "search", { conditions: JSON.stringify(conditions) });
    if (!data) return;
    const results = Array.isArray(data.results) ? data.results : [];
    const weights = Array.isArray(data.conditions) && data.conditions.length ? data.conditions : conditions;
    const cards = results.map((r) => resultCard(r, weights));
    if (append) list.append(...cards);
    else list.replaceChildren(...cards);
    const total = list.children.length;
    if (!total) {
      message.textContent = `No results for ${describeQuery(state.query)}.`;
      message.classList.remove("is-error");
      message.hidden = false;
    } else {
      message.hidden = true;
    }
    els.more.hidden = results.length < k;
    const under = weights.map((c) => (c.weight < 0 ? `not ${label(c.instruction)}` : label(c.instruction))).join(" + ");
    setStatus(sentence(total ? `${total} results for ${describeQuery(state.query)} under ${under}` : `No results under ${under}`));
    markDone(list, total ? "done" : "empty", { conditions: JSON.stringify(conditions) });
  }

  els.more.addEventListener("click", () => {
    state.offset += kValue();
    run({ append: true });
  });

  async function runCompare(seq) {
    const box = els.compare;
    const message = els.compareMessage;
    let instructions;
    try {
      instructions = selectedConditions().map((c) => c.instruction);
    } catch (err) {
      instructions = [];
    }
    if (instructions.length < 2 || instructions.length > 4) {
      failList(box, message, `Tick 2 to 4 instructions to compare them side by side (${instructions.length} ticked).`);
      message.classList.remove("is-error");
      setStatus("Compare needs 2 to 4 instructions.");
      markDone(box, "empty", { instructions: JSON.stringify(instructions) });
      return;
    }
    box.dataset.state = "loading";
    box.setAttribute("aria-busy", "true");
    setStatus(`Comparing ${instructions.map(label).join(", ")} for ${describeQuery(state.query)}…`);
    const data = await fetchInto(box, message, seq, "/api/compare", queryBody({ instructions, k: kValue() }),
      "comparison", { instructions: JSON.stringify(instructions) });
    if (!data) return;
    const columns = Array.isArray(data.columns) ? data.columns : [];
    box.style.setProperty("--columns", String(Math.max(1, columns.length)));
    box.replaceChildren(...columns.map((column) => compareColumn(column)));
    message.hidden = columns.length > 0;
    if (!columns.length) {
      message.textContent = "The comparison returned no columns.";
      message.classList.remove("is-error");
    }
    setStatus(sentence(`Compared ${columns.map((c) => label(c.instruction)).join(", ")} for ${describeQuery(state.query)}`));
    markDone(box, columns.length ? "done" : "empty", { instructions: JSON.stringify(instructions) });
  }

  function compareColumn(column) {
    const section = document.createElement("section");
    section.className = "compare-column";
    section.dataset.testid = "compare-column";
    section.dataset.instruction = column.instruction;
    const heading = document.createElement("h3");
    heading.textContent = label(column.instruction);
    const list = document.createElement("ol");
    list.className = "compare-list";
    const results = Array.isArray(column.results) ? column.results : [];
    list.append(...results.map((r) => resultCard(r, [{ instruction: column.instruction, weight: 1 }])));
    section.append(heading, list);
    if (!results.length) section.append(paragraph("No results.", "muted"));
    return section;
  }

  const fmt = (x) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(3) : "–");

  // A thumbnail button that searches by its image ("more like this"); `testid` tells lists apart.
  function imageButton(r, testid) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "result";
    button.dataset.testid = testid;
    button.dataset.imageId = r.image_id;
    button.dataset.name = r.name || "";
    button.title = `More like ${r.name || "this"}`;

    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = "";
    img.width = 256;
    img.height = 256;
    img.src = r.thumbnail || `/api/thumbnails/${encodeURIComponent(r.image_id)}?size=256`;
    img.addEventListener("error", () => img.classList.add("broken"), { once: true });

    const name = document.createElement("span");
    name.className = "result-name";
    name.textContent = r.name || r.image_id;
    button.append(img, name);
    button.addEventListener("click", () => searchByImage(r.image_id, r.name));
    return button;
  }

  function collectionCard(r) {
    const item = document.createElement("li");
    item.className = "result-item";
    item.append(imageButton(r, "collection-image"));
    return item;
  }

  function resultCard(r, conditions) {
    const item = document.createElement("li");
    item.className = "result-item";
    const button = imageButton(r, "result");

    const score = document.createElement("span");
    score.className = "result-score";
    score.dataset.testid = "result-score";
    score.textContent = `score ${fmt(r.score)}`;

    button.append(score);
    if (conditions.length > 1 && r.scores && typeof r.scores === "object") {
      const scores = document.createElement("span");
      scores.className = "result-scores";
      scores.dataset.testid = "result-scores";
      scores.textContent = conditions
        .map((c) => `${c.weight < 0 ? "not " : ""}${label(c.instruction)} ${fmt(r.scores[c.instruction])}`)
        .join(" · ");
      button.append(scores);
    }
    item.append(button);
    return item;
  }

  // ---------------------------------------------------------------------------------------------

  setMode("search", { rerun: false });
  history.replaceState(historyState(), "");
  loadConditions();
})();
