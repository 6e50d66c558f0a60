// gpujobq web board: polls /api/board, follows a job's output from /api/logs.
// Plain JavaScript, no framework, nothing fetched from anywhere but this controller.
// Every value from the server reaches the page as text (textContent), never as HTML.
"use strict";

(() => {
  const POLL_MS = 2000; // how often the board asks; paused while the tab is hidden
  const TOKEN_KEY = "gpujobq.token"; // sessionStorage: this tab only, gone when it closes
  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY);
  let me = null; // the token's user, once the server has said
  let timer = null;
  let busy = false;
  let again = false; // a refresh was asked for while one was on its way

  // ---- small helpers ----------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings become text
    }
    return node;
  }

  function authHeaders() {
    return token ? { Authorization: "Bearer " + token } : {};
  }

  async function detailOf(response) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") return body.detail;
    } catch (_) { /* not JSON */ }
    return "HTTP " + response.status;
  }

  // The server's times are UTC without an offset ("2025-11-06T10:30:00").
  function parseTime(iso) {
    return iso ? new Date(iso + "Z") : null;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    const m = Math.round(s / 60);
    if (m < 60) return m + " min";
    const h = Math.floor(m / 60);
    if (h < 48) return h + " h " + (m % 60) + " min";
    return Math.round(h / 24) + " days";
  }

  function clock(iso) {
    const t = parseTime(iso);
    return t ? t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
  }

  function relative(iso) {
    const t = parseTime(iso);
    if (!t) return "–";
    const s = (t.getTime() - Date.now()) / 1000;
    if (s <= 5) return "now (" + clock(iso) + ")";
    return "in " + duration(s) + " (" + clock(iso) + ")";
  }

  // A job id's last 8 characters: its random part (ids begin with their time, the same
  // for every job of a minute). The whole id is in the cell's or row's title.
  function shortId(id) {
    return id.length > 8 ? "…" + id.slice(-8) : id;
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  // ---- the token -------------------------------------------------------------------

  function setToken(value) {
    token = value || null;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("forget").hidden = !token;
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    showError("");
    setToken(value);
    closeLog();
    refreshNow();
  });

  $("forget").addEventListener("click", () => {
    setToken(null);
    showError("");
    closeLog();
    refreshNow();
  });

  // ---- polling ---------------------------------------------------------------------

  function schedule() {
    clearTimeout(timer);
    timer = document.hidden ? null : setTimeout(refresh, POLL_MS);
  }

  function refreshNow() {
    if (busy) again = true;
    else refresh();
  }

  async function refresh() {
    busy = true;
    try {
      const response = await fetch("/api/board", { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401 && token) {
        // A bad or expired token: say so, forget it, and show the public board.
        showError("Token not accepted (" + (await detailOf(response)) +
          "); showing the public board.");
        setToken(null);
        closeLog();
        again = true;
        return;
      }
      if (!response.ok) throw new Error(await detailOf(response));
      render(await response.json());
      $("updated").textContent = "live · updated " + new Date().toLocaleTimeString();
    } catch (err) {
      $("updated").textContent = "cannot reach the controller (" + err.message + "); retrying";
    } finally {
      busy = false;
      if (again) {
        again = false;
        refresh();
      } else {
        schedule();
      }
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(timer);
    else refreshNow();
  });

  // ---- rendering -------------------------------------------------------------------

  function render(board) {
    me = board.user_id;
    $("who").textContent = me
      ? "Signed in as " + me + (board.admin ? " (admin): every job is shown." : ".")
      : "Public view: GPUs and the queue, no names or jobs.";
    $("forget").hidden = !token;
    renderQueue(board.queue);
    renderHosts(board.hosts);
    $("mine").hidden = !me;
    if (me) renderJobs(board.jobs);
    $("all").hidden = !board.admin;
    if (board.admin) renderActive(board.active);
  }

  function renderQueue(q) {
    $("q-pending").textContent = String(q.pending);
    $("q-running").textContent = String(q.running);
    const wait = $("q-wait");
    if (q.expected_wait === null) {
      wait.replaceChildren("unknown", el("small", {}, q.wait_reason || ""));
    } else if (q.expected_wait <= 0) {
      wait.replaceChildren("none", el("small", {}, "a GPU is free"));
    } else {
      wait.replaceChildren("≈ " + duration(q.expected_wait),
        el("small", {}, "starts about " + clock(q.expected_start)));
    }
  }

  // What a GPU's cell shows: a down host's GPUs are down, a drained host's free ones
  // drained; otherwise the GPU's own state.
  function cellState(host, gpu) {
    if (host.state === "down") return "down";
    if (host.state === "drained" && gpu.state === "free") return "drained";
    return gpu.state;
  }

  function renderHosts(hosts) {
    const cards = hosts.map((host) => {
      const cells = host.gpus.map((gpu) => {
        const state = cellState(host, gpu);
        const lines = [el("b", {}, "GPU " + gpu.index), state];
        if (gpu.job_id) lines.push(el("br"), shortId(gpu.job_id));
        if (gpu.user_id) lines.push(el("br"), gpu.user_id);
        const title = [host.name + " GPU " + gpu.index, gpu.name, state,
          gpu.mine ? "your job" : "", gpu.job_id || "", gpu.user_id || ""].filter(Boolean);
        const cell = el("div", {
          class: "gpu s-" + state + (gpu.mine ? " mine" : "") + (gpu.job_id ? " clickable" : ""),
          title: title.join(" · "),
          "data-host": host.name, "data-index": String(gpu.index), "data-state": state,
          "data-mine": gpu.mine ? "true" : "false",
        }, ...lines);
        if (gpu.job_id) cell.addEventListener("click", () => openLog(gpu.job_id, gpu.user_id));
        return cell;
      });
      return el("div", { class: "host h-" + host.state, "data-host": host.name },
        el("div", { class: "host-head" },
          el("span", { class: "host-name" }, host.name),
          el("span", { class: "badge h-" + host.state }, host.state)),
        cells.length ? el("div", { class: "gpus" }, ...cells)
          : el("p", { class: "no-gpus" }, "no GPUs known yet"));
    });
    $("hosts").replaceChildren(...cards);
  }

  function where(job) {
    if (!job.node) return "–";
    return job.node + (job.gpus.length ? " / " + job.gpus.join(", ") : "");
  }

  function statusCell(job) {
    return el("td", {}, el("span", { class: "st st-" + job.status }, job.status));
  }

  function jobRow(job, cells, withLog) {
    const row = el("tr", {
      "data-job": job.job_id, "data-status": job.status,
      class: (withLog ? "clickable" : "") + (job.job_id === logJob ? " open" : ""),
      title: job.job_id,
    }, ...cells);
    if (withLog) row.addEventListener("click", () => openLog(job.job_id, job.user_id));
    return row;
  }

  // A job's row: the admin's list adds its user; a user's own list adds the reason.
  function jobCells(job, withUser) {
    return [
      el("td", {}, el("code", {title: job.job_id}, shortId(job.job_id))),
      withUser ? el("td", {}, job.user_id) : null,
      statusCell(job),
      el("td", {}, job.queue_position === null ? "–" : String(job.queue_position)),
      el("td", {}, job.status === "pending" ? relative(job.estimated_start) : "–"),
      el("td", {}, where(job)),
      el("td", {}, job.competition_id),
      el("td", {}, job.started_at ? clock(job.started_at) : "–"),
      withUser ? null : el("td", { class: "reason" }, job.pending_reason || job.reason || ""),
    ].filter((cell) => cell !== null);
  }

  function renderJobs(jobs) {
    const rows = jobs.map((job) => jobRow(job, jobCells(job, false), true));
    $("jobs").tBodies[0].replaceChildren(...rows);
    $("jobs-empty").hidden = rows.length > 0;
  }

  function renderActive(jobs) {
    // An admin follows anyone's job (through /api/admin/logs).
    const rows = jobs.map((job) => jobRow(job, jobCells(job, true), true));
    $("active").tBodies[0].replaceChildren(...rows);
    $("active-empty").hidden = rows.length > 0;
  }

  // ---- live output -----------------------------------------------------------------
  // /api/logs/{id}?follow=true is read with fetch (an EventSource cannot send the
  // Authorization header) and its server-sent events are parsed here.

  const encoder = new TextEncoder();
  let logJob = null;
  let logOwner = null; // whose job the open log is (artifacts are shown for one's own)
  let logAbort = null;
  let segments = []; // {stream, offset, bytes, span}, in arrival order
  let ends = { stdout: 0, stderr: 0 }; // byte offset where each stream's text ends

  // The stream bytes a text stands for: the server says (`size`); an invalid byte is
  // one U+FFFD in the text, three bytes in UTF-8, so the text's own length can differ.
  function byteLength(data) {
    return typeof data.size === "number" ? data.size : encoder.encode(data.text).length;
  }

  function truncate(stream, at) {
    segments = segments.filter((seg) => {
      if (seg.stream !== stream || seg.offset + seg.bytes <= at) return true;
      if (seg.offset >= at) {
        seg.span.remove();
        return false;
      }
      const kept = encoder.encode(seg.span.textContent).slice(0, at - seg.offset);
      seg.span.textContent = new TextDecoder().decode(kept);
      seg.bytes = at - seg.offset;
      return true;
    });
    ends[stream] = at;
  }

  function appendToLog(node) {
    const pre = $("log-text");
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    pre.append(node);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function onOutput(data) {
    const stream = data.stream === "stderr" ? "stderr" : "stdout";
    // Later text from an earlier offset replaces what was shown from there on.
    if (data.offset < ends[stream]) truncate(stream, data.offset);
    const span = el("span", { class: stream }, data.text);
    const bytes = byteLength(data);
    segments.push({ stream, offset: data.offset, bytes, span });
    ends[stream] = data.offset + bytes;
    appendToLog(span);
  }

  function resetLog() {
    segments = [];
    ends = { stdout: 0, stderr: 0 };
    $("log-text").replaceChildren();
    $("log-files").hidden = true;
  }

  // ---- a finished job's files (/api/artifacts: the token's own jobs) ---------------

  function sizeText(bytes) {
    if (bytes < 1024) return bytes + " B";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KiB";
    return (bytes / 1024 / 1024).toFixed(1) + " MiB";
  }

  function artifactPath(jobId, name) {
    return "/api/artifacts/" + encodeURIComponent(jobId) +
      (name === undefined ? "" : "/" + name.split("/").map(encodeURIComponent).join("/"));
  }

  async function showFiles(jobId) {
    let listed;
    try {
      const response = await fetch(artifactPath(jobId),
        { headers: authHeaders(), cache: "no-store" });
      if (!response.ok) return;
      listed = await response.json();
    } catch (_) {
      return;
    }
    if (logJob !== jobId || !listed.files.length) return;
    $("log-files-list").replaceChildren(...listed.files.map((file) => el("li", {},
      el("button", { type: "button", class: "file", onclick: () => download(jobId, file.name) },
        file.name),
      " " + sizeText(file.size))));
    $("log-files").hidden = false;
  }

  // The file comes with the token (a plain link could not send it), then is saved.
  async function download(jobId, name) {
    const response = await fetch(artifactPath(jobId, name),
      { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) {
      showError("Download failed: " + (await detailOf(response)));
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: name.split("/").pop() });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function onEvent(kind, text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch (_) {
      return;
    }
    if (kind === "output") {
      onOutput(data);
    } else if (kind === "restart") {
      resetLog();
      appendToLog(el("span", { class: "marker" },
        "— the job runs again (attempt " + data.attempt + "); its output starts over —\n"));
    } else if (kind === "end") {
      const code = data.exit_code === null ? "" : ", exit code " + data.exit_code;
      $("log-status").textContent = "Ended: " + data.status + code +
        (data.reason ? " (" + data.reason + ")" : "") + ".";
      if (logOwner === null || logOwner === me) showFiles(logJob);
      return "end";
    }
    return null;
  }

  // Reads the stream; returns true once `end` came.
  async function readEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let kind = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value;
      // A lone CR at the end may be the first half of a CRLF: keep it for later.
      const lines = buffer.split(/\r\n|\n|\r(?!$)/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length && onEvent(kind, data.join("\n")) === "end") return true;
          kind = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") kind = value;
          else if (field === "data") data.push(value);
        }
      }
    }
  }

  // /api/logs serves the token's own jobs; an admin reads others' at /api/admin/logs.
  function logPath(jobId, owner) {
    const base = owner && owner !== me ? "/api/admin/logs/" : "/api/logs/";
    return base + encodeURIComponent(jobId) + "?follow=true";
  }

  async function openLog(jobId, owner) {
    closeLog();
    logJob = jobId;
    logOwner = owner || null;
    const abort = new AbortController();
    logAbort = abort;
    $("log").hidden = false;
    $("log-job").textContent = jobId;
    $("log-status").textContent = "Connecting…";
    resetLog();
    markOpenRow();
    try {
      const response = await fetch(
        logPath(jobId, owner),
        { headers: { ...authHeaders(), Accept: "text/event-stream" }, signal: abort.signal,
          cache: "no-store" });
      if (!response.ok) {
        const detail = await detailOf(response);
        if (response.status >= 500) { // the controller stopping, storage full: try again
          $("log-status").textContent = "Log unavailable (" + detail + "); retrying…";
          setTimeout(() => { if (logAbort === abort) openLog(jobId, owner); }, POLL_MS);
        } else {
          $("log-status").textContent = "Cannot show this log: " + detail;
        }
        return;
      }
      $("log-status").textContent = "Live: output appears as the job prints.";
      const ended = await readEvents(response.body);
      if (!ended && logAbort === abort) {
        // The connection closed before the job ended (a restart of the controller, a
        // proxy's timeout): follow again, from the start.
        $("log-status").textContent = "Connection lost; reconnecting…";
        setTimeout(() => { if (logAbort === abort) openLog(jobId, owner); }, POLL_MS);
      }
    } catch (err) {
      if (logAbort === abort && err.name !== "AbortError") {
        $("log-status").textContent = "Log stream failed (" + err.message + "); reconnecting…";
        setTimeout(() => { if (logAbort === abort) openLog(jobId, owner); }, POLL_MS);
      }
    }
  }

  function closeLog() {
    if (logAbort) logAbort.abort();
    logAbort = null;
    logJob = null;
    $("log").hidden = true;
    markOpenRow();
  }

  function markOpenRow() {
    for (const row of document.querySelectorAll("tr[data-job]")) {
      row.classList.toggle("open", row.dataset.job === logJob);
    }
  }

  $("log-close").addEventListener("click", closeLog);

  setToken(token);
  refresh();
})();
