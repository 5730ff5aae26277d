// The web page's script: posts the image and question to /v1/analyze with stream=true and shows the events as they
// come (docs/api.md "Web page", "Streaming"). Server text (answers, image text, errors) goes into the page only through
// textContent: it is untrusted, and is never parsed as markup.
"use strict";

(() => {
  const TEXTS = {
    en: {
      page_title: "Ask about an image",
      skip_to_result: "Skip to the answer",
      title: "Ask about an image",
      subtitle: "A vision model looks at the image; a language model reasons about it when the question needs it.",
      lang_toggle: "中文",
      lang_toggle_label: "切换到中文",
      ask_heading: "Your question",
      image_label: "Image",
      drop_hint: "Drag an image here, paste one, or press to choose a file",
      no_image: "No image chosen",
      chosen_image: "Chosen: {name} ({size})",
      question_label: "Question",
      question_placeholder: "What is the total? Why is the total higher than the subtotal?",
      question_hint: "Ctrl+Enter asks.",
      mode_label: "Mode",
      mode_auto: "Auto: the router decides",
      mode_vision: "Vision only",
      mode_reasoning: "Always reason",
      profile_label: "Profile",
      profile_general: "General",
      profile_medical: "Medical",
      profile_legal: "Legal",
      profile_finance: "Finance",
      key_summary: "API key (optional)",
      key_label: "API key",
      key_hint: "Sent as “Authorization: Bearer …”; kept in this browser tab only.",
      submit: "Ask",
      stop: "Stop",
      result_heading: "Answer",
      status_idle: "Choose an image and ask a question.",
      status_sending: "Sending the image; the vision stage is looking at it…",
      status_vision: "The vision stage has looked; waiting for the answer…",
      status_reasoning: "The language model is writing…",
      status_done: "Done.",
      status_stopped: "Stopped.",
      status_failed: "Failed: see the error below.",
      error_heading: "Error",
      stage_error_heading: "A stage failed mid-answer",
      error_http: "The service answered HTTP {status}",
      error_retry: "Retry after {seconds} s.",
      error_network: "The service could not be reached",
      error_stream_cut: "The answer stream ended before it was complete",
      error_stream: "The service reported an error while answering",
      error_stage: "The answer below comes from a fallback",
      error_need_image: "Choose an image first",
      error_need_question: "Type a question first",
      error_auth: "The service needs an API key: enter it under “API key”.",
      request_id: "Request id: {id}",
      replaced: "The streamed text was replaced by the final answer.",
      degraded: "Degraded: the language model failed, so this is the vision stage's answer.",
      mode_vision_only: "Vision only",
      mode_vision_then_reasoning: "Vision, then reasoning",
      review_needed: "Needs human review",
      review_not_needed: "No human review needed",
      confidence: "Confidence {value}",
      disclaimer_heading: "Disclaimer",
      notices_heading: "Notices",
      route_heading: "Route",
      route_score: "score {score}",
      route_forced: "score {score}, forced by the chosen mode",
      thinking_heading: "The language model's thinking",
      checks_heading: "Claim checks",
      col_claim: "Claim",
      col_referent: "About",
      col_verdict: "Verdict",
      col_reason: "Why",
      col_evidence: "Evidence in the image",
      evidence_heading: "Evidence on the image",
      evidence_hint: "Outlined: the text the vision stage read and the places it named. Point at or select a claim "
        + "check to see what it cites.",
      evidence_image_alt: "The image, with the text read and the places named outlined",
      arbitration_agreed: "Agrees with the image",
      arbitration_corrected: "Corrected after a contradiction",
      arbitration_needs_review: "Needs review",
      arbitration_skipped: "Not checked",
      verdict_supported: "supported",
      verdict_contradicted: "contradicted",
      verdict_unverifiable: "unverifiable",
      vision_heading: "What the vision stage saw",
      vision_description: "Description",
      vision_answer: "The vision stage's own answer",
      vision_model: "Vision: {backend} · {model} · {ms} ms",
      reasoning_model: "Reasoning: {backend} · {model} · {tokens} tokens · finish {finish}",
      failures_heading: "Stage failures",
      failure: "{stage} stage ({backend}): {type}: {message}",
      timings_heading: "Timings",
      timing_route: "Routing",
      timing_vision: "Vision",
      timing_reasoning: "Reasoning",
      timing_vision_answer: "Vision fallback answer",
      timing_arbitration: "Claim checks",
      timing_total: "Total",
      ms: "{ms} ms",
    },
    zh: {
      page_title: "看图提问",
      skip_to_result: "跳到回答",
      title: "看图提问",
      subtitle: "视觉模型先看图；问题需要推理时，再由语言模型作答。",
      lang_toggle: "English",
      lang_toggle_label: "Switch to English",
      ask_heading: "你的问题",
      image_label: "图片",
      drop_hint: "把图片拖到这里、粘贴，或按下选择文件",
      no_image: "尚未选择图片",
      chosen_image: "已选择：{name}（{size}）",
      question_label: "问题",
      question_placeholder: "一共多少钱？为什么总价比小计高？",
      question_hint: "按 Ctrl+Enter 提问。",
      mode_label: "模式",
      mode_auto: "自动：由路由器决定",
      mode_vision: "只用视觉模型",
      mode_reasoning: "总是推理",
      profile_label: "领域",
      profile_general: "通用",
      profile_medical: "医疗",
      profile_legal: "法律",
      profile_finance: "金融",
      key_summary: "API 密钥（可选）",
      key_label: "API 密钥",
      key_hint: "以“Authorization: Bearer …”发送；只保存在此浏览器标签页中。",
      submit: "提问",
      stop: "停止",
      result_heading: "回答",
      status_idle: "请选择图片并输入问题。",
      status_sending: "正在发送图片，视觉模型正在看图……",
      status_vision: "视觉模型已看完，正在等待回答……",
      status_reasoning: "语言模型正在作答……",
      status_done: "完成。",
      status_stopped: "已停止。",
      status_failed: "失败：见下方错误。",
      error_heading: "错误",
      stage_error_heading: "某个阶段在作答途中失败",
      error_http: "服务返回 HTTP {status}",
      error_retry: "请 {seconds} 秒后重试。",
      error_network: "无法连接服务",
      error_stream_cut: "回答流在完成前中断了",
      error_stream: "服务在作答时报告了错误",
      error_stage: "下面的回答来自备用结果",
      error_need_image: "请先选择图片",
      error_need_question: "请先输入问题",
      error_auth: "服务需要 API 密钥：请在“API 密钥”中填写。",
      request_id: "请求编号：{id}",
      replaced: "流式输出的文字已被最终回答替换。",
      degraded: "降级：语言模型失败，以下是视觉模型的回答。",
      mode_vision_only: "只用视觉",
      mode_vision_then_reasoning: "先视觉，后推理",
      review_needed: "需要人工复核",
      review_not_needed: "无需人工复核",
      confidence: "置信度 {value}",
      disclaimer_heading: "免责声明",
      notices_heading: "提示",
      route_heading: "路由",
      route_score: "分数 {score}",
      route_forced: "分数 {score}，由所选模式强制",
      thinking_heading: "语言模型的思考过程",
      checks_heading: "论断核查",
      col_claim: "论断",
      col_referent: "对象",
      col_verdict: "结论",
      col_reason: "理由",
      col_evidence: "图中证据",
      evidence_heading: "图上的证据",
      evidence_hint: "框出的是视觉阶段读到的文字和指出的位置。指向或选中一条论断核查，即可看到它引用的证据。",
      evidence_image_alt: "图片，框出了读到的文字和指出的位置",
      arbitration_agreed: "与图片一致",
      arbitration_corrected: "发现矛盾后已更正",
      arbitration_needs_review: "需要复核",
      arbitration_skipped: "未核查",
      verdict_supported: "有依据",
      verdict_contradicted: "相矛盾",
      verdict_unverifiable: "无法核实",
      vision_heading: "视觉模型看到的内容",
      vision_description: "描述",
      vision_answer: "视觉模型自己的回答",
      vision_model: "视觉：{backend} · {model} · {ms} 毫秒",
      reasoning_model: "推理：{backend} · {model} · {tokens} 个词元 · 结束原因 {finish}",
      failures_heading: "失败的阶段",
      failure: "{stage} 阶段（{backend}）：{type}：{message}",
      timings_heading: "耗时",
      timing_route: "路由",
      timing_vision: "视觉",
      timing_reasoning: "推理",
      timing_vision_answer: "视觉备用回答",
      timing_arbitration: "论断核查",
      timing_total: "总计",
      ms: "{ms} 毫秒",
    },
  };
  const LANGUAGE_KEY = "orchestrator.language";
  const API_KEY_KEY = "orchestrator.apiKey";
  const $ = (id) => document.getElementById(id);

  let language = initialLanguage();
  let chosenFile = null;
  let previewUrl = null;
  let controller = null;
  let pinned = null; // the claim check whose evidence stays highlighted (selected), or null

  function initialLanguage() {
    const stored = localStorage.getItem(LANGUAGE_KEY);
    if (stored === "en" || stored === "zh") return stored;
    const preferred = navigator.languages && navigator.languages.length ? navigator.languages[0] : navigator.language;
    return String(preferred || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
  }

  function t(key, args) {
    const template = TEXTS[language][key] ?? TEXTS.en[key] ?? key;
    return template.replace(/\{(\w+)\}/g, (_, name) => (args && name in args ? String(args[name]) : ""));
  }

  // Sets `element`'s text to the message `key`, and remembers it so that a language switch re-translates it.
  function say(element, key, args) {
    element.dataset.i18n = key;
    if (args) element.dataset.i18nArgs = JSON.stringify(args);
    else delete element.dataset.i18nArgs;
    element.textContent = t(key, args);
    return element;
  }

  // Sets `element`'s text to server text, as given (no translation; never markup).
  function show(element, text) {
    delete element.dataset.i18n;
    delete element.dataset.i18nArgs;
    element.textContent = text == null ? "" : String(text);
    return element;
  }

  function make(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text != null) element.textContent = String(text);
    return element;
  }

  function applyLanguage() {
    document.documentElement.lang = language === "zh" ? "zh-CN" : "en";
    for (const element of document.querySelectorAll("[data-i18n]")) {
      const args = element.dataset.i18nArgs ? JSON.parse(element.dataset.i18nArgs) : undefined;
      element.textContent = t(element.dataset.i18n, args);
    }
    for (const element of document.querySelectorAll("[data-i18n-placeholder]")) {
      element.placeholder = t(element.dataset.i18nPlaceholder);
    }
    for (const element of document.querySelectorAll("[data-i18n-alt]")) element.alt = t(element.dataset.i18nAlt);
    const toggle = $("lang-toggle");
    toggle.textContent = t("lang_toggle");
    toggle.lang = language === "zh" ? "en" : "zh-CN";
    toggle.setAttribute("aria-label", t("lang_toggle_label"));
  }

  function switchLanguage() {
    language = language === "zh" ? "en" : "zh";
    localStorage.setItem(LANGUAGE_KEY, language);
    applyLanguage();
  }

  // ---- choosing the image

  function formatSize(bytes) {
    if (bytes >= 1024 * 1024) return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
    return `${Math.max(1, Math.round(bytes / 1024))} KB`;
  }

  function choose(file) {
    if (!file) return;
    chosenFile = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    const preview = $("preview");
    preview.src = previewUrl;
    preview.hidden = false;
    say($("file-name"), "chosen_image", { name: file.name || "image", size: formatSize(file.size) });
  }

  function wireImagePicking() {
    const input = $("image");
    const zone = $("dropzone");
    const preview = $("preview");
    preview.addEventListener("error", () => {
      preview.hidden = true;
    });
    input.addEventListener("change", () => choose(input.files && input.files[0]));
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (event) => {
        event.preventDefault();
        zone.classList.add("dragging");
      });
    }
    for (const name of ["dragleave", "dragend"]) zone.addEventListener(name, () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      const files = event.dataTransfer && event.dataTransfer.files;
      if (files && files.length) choose(files[0]);
    });
    document.addEventListener("paste", (event) => {
      const items = event.clipboardData ? Array.from(event.clipboardData.files) : [];
      const image = items.find((file) => file.type.startsWith("image/"));
      if (image) choose(image);
    });
  }

  // ---- the result panel

  const PARTS = [
    "error", "flags", "degraded", "answer-box", "replaced", "disclaimer-box", "notices-box", "route-box",
    "thinking-box", "checks-box", "evidence-box", "vision-box", "vision-answer-box", "failures-box", "timings-box",
  ];

  function setState(state, statusKey) {
    $("result").dataset.state = state;
    say($("status"), statusKey);
    $("answer").setAttribute("aria-busy", state === "running" ? "true" : "false");
  }

  function clearResult() {
    for (const id of PARTS) $(id).hidden = true;
    for (const id of ["answer", "thinking", "notices", "failures", "timings", "vision-notes"]) show($(id), "");
    $("checks").tBodies[0].replaceChildren();
    $("evidence-overlay").replaceChildren();
    pinned = null;
  }

  // Shows an error; `stage`: a stage failed mid-answer and a fallback answer follows (a warning, not a failure).
  function showError({ titleKey, titleArgs, type, message, requestId, extraKey, extraArgs, stage = false }) {
    $("error").classList.toggle("stage", stage);
    say($("error-heading"), stage ? "stage_error_heading" : "error_heading");
    say($("error-title"), titleKey, titleArgs);
    show($("error-type"), type || "").hidden = !type;
    show($("error-message"), message || "");
    if (extraKey) say($("error-extra"), extraKey, extraArgs);
    else show($("error-extra"), "");
    if (requestId) say($("error-meta"), "request_id", { id: requestId });
    else show($("error-meta"), "");
    $("error").hidden = false;
  }

  async function showHttpError(response) {
    const text = await response.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
    const error = body && body.error ? body.error : {};
    const retry = response.headers.get("Retry-After");
    const auth = response.status === 401 || response.status === 403;
    showError({
      titleKey: "error_http",
      titleArgs: { status: response.status },
      type: error.type,
      message: error.message || text.slice(0, 500),
      requestId: error.request_id || response.headers.get("X-Request-ID"),
      extraKey: auth ? "error_auth" : retry ? "error_retry" : null,
      extraArgs: { seconds: retry },
    });
    if (auth) {
      $("key-box").open = true;
      $("api-key").focus();
    }
  }

  function renderRoute(route) {
    const forced = route.forced;
    say($("route-decision"), `mode_${route.decision}`);
    say($("route-score"), forced ? "route_forced" : "route_score", { score: Number(route.score).toFixed(2) });
    show($("route-reason"), route.reason);
    $("route-box").hidden = false;
  }

  function renderVision(vision) {
    show($("vision-caption"), vision.caption);
    show($("vision-description"), vision.description);
    if (vision.answer) {
      show($("vision-answer"), vision.answer);
      $("vision-answer-box").hidden = false;
    }
    $("vision-notes").replaceChildren(...(vision.notes || []).map((note) => make("li", null, note)));
    const ms = Number(vision.latency_ms).toFixed(1);
    say($("vision-model"), "vision_model", { backend: vision.backend, model: vision.model, ms });
    $("vision-box").hidden = false;
    renderEvidenceImage(vision);
  }

  // ---- evidence on the image: an SVG over the uploaded image, in the image's own pixels (its viewBox)

  const SVG = "http://www.w3.org/2000/svg";

  function outline(points, className) {
    const shape = document.createElementNS(SVG, "polygon");
    shape.setAttribute("points", points.map(([x, y]) => `${Number(x)},${Number(y)}`).join(" "));
    shape.setAttribute("class", className);
    return shape;
  }

  // A grounding box on GLM's 0–1000 scale, as the four corners of a text line's box, in pixels.
  function corners(box, width, height) {
    const [x0, y0, x1, y1] = [box.x0 * width / 1000, box.y0 * height / 1000, box.x1 * width / 1000,
      box.y1 * height / 1000];
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
  }

  function renderEvidenceImage(vision) {
    const structured = vision.structured || {};
    const facts = structured.facts;
    if (!previewUrl || !facts || !facts.width || !facts.height) return;
    const { width, height } = facts;
    $("evidence-image").src = previewUrl;
    const overlay = $("evidence-overlay");
    overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const read = (structured.text_lines || []).map((line) => outline(line.box, "read-line"));
    const named = [...(structured.objects || []).map((item) => item.box).filter(Boolean), ...(vision.boxes || [])];
    const grounded = named.map((box) => outline(corners(box, width, height), "grounded"));
    const cited = document.createElementNS(SVG, "g");
    cited.id = "evidence-cited";
    overlay.replaceChildren(...read, ...grounded, cited);
    $("evidence-box").hidden = false;
  }

  // Highlights the boxes `check` cites: the vision stage's reading, and the witness's where it read otherwise.
  function cite(check) {
    const cited = $("evidence-cited");
    if (!cited) return;
    const boxes = (item, className) => ((item && item.boxes) || []).map((box) => outline(box, className));
    cited.replaceChildren(...(check ? [...boxes(check.evidence, "cited"), ...boxes(check.witness, "cited witness")]
      : []));
  }

  function pin(check, row) {
    pinned = pinned === check ? null : check;
    for (const other of row.parentElement.rows) other.setAttribute("aria-selected", "false");
    if (pinned) row.setAttribute("aria-selected", "true");
    cite(pinned);
  }

  function setAnswer(text, answerLanguage) {
    const answer = show($("answer"), text);
    if (answerLanguage) answer.lang = answerLanguage === "zh" ? "zh-CN" : "en";
    else answer.removeAttribute("lang");
    $("answer-box").hidden = false;
  }

  function appendDelta(delta) {
    if (delta.text) {
      $("answer").append(delta.text);
      $("answer-box").hidden = false;
      say($("status"), "status_reasoning");
    }
    if (delta.thinking) {
      $("thinking").append(delta.thinking);
      $("thinking-box").hidden = false;
    }
  }

  function checkRow(check) {
    const row = document.createElement("tr");
    row.className = `verdict-${check.verdict}`;
    const verdict = make("span", `badge verdict verdict-${check.verdict}`);
    say(verdict, `verdict_${check.verdict}`);
    const read = (item) => `“${item.text}” (${item.where})`;
    const evidence = [check.evidence, check.witness].filter(Boolean).map(read).join(" ≠ ") || "—";
    const cells = [make("td", null, check.claim), make("td", null, check.referent), make("td"),
      make("td", null, check.reason), make("td", null, evidence)];
    cells[2].append(verdict);
    row.append(...cells);
    row.tabIndex = 0;
    row.setAttribute("aria-selected", "false");
    row.addEventListener("mouseenter", () => cite(check));
    row.addEventListener("focus", () => cite(check));
    row.addEventListener("mouseleave", () => cite(pinned));
    row.addEventListener("blur", () => cite(pinned));
    row.addEventListener("click", () => pin(check, row));
    row.addEventListener("keydown", (event) => {
      if (event.key !== "Enter" && event.key !== " ") return;
      event.preventDefault();
      pin(check, row);
    });
    return row;
  }

  function renderArbitration(arbitration) {
    say($("arbitration-status"), `arbitration_${arbitration.status}`);
    show($("arbitration-reason"), arbitration.reason);
    const body = $("checks").tBodies[0];
    body.replaceChildren(...arbitration.checks.map(checkRow));
    $("checks-table").hidden = !arbitration.checks.length;
    $("checks-box").hidden = false;
  }

  function renderFlags(response) {
    say($("badge-mode"), `mode_${response.mode}`);
    const review = $("badge-review");
    say(review, response.needs_human_review ? "review_needed" : "review_not_needed");
    review.classList.toggle("warning", Boolean(response.needs_human_review));
    say($("badge-confidence"), "confidence", { value: Number(response.confidence).toFixed(2) });
    $("flags").hidden = false;
    if (response.degraded) say($("degraded"), "degraded");
    $("degraded").hidden = !response.degraded;
    if (response.disclaimer) show($("disclaimer"), response.disclaimer);
    $("disclaimer-box").hidden = !response.disclaimer;
    $("notices").replaceChildren(...response.notices.map((notice) => make("li", null, notice)));
    $("notices-box").hidden = !response.notices.length;
  }

  function renderFailures(failures) {
    $("failures").replaceChildren(...failures.map((failure) => say(make("li"), "failure", {
      stage: failure.stage, backend: failure.backend, type: failure.error_type, message: failure.message,
    })));
    $("failures-box").hidden = !failures.length;
  }

  function renderTimings(response) {
    const items = [];
    for (const [stage, ms] of Object.entries(response.timings_ms)) {
      const label = make("dt");
      if (TEXTS.en[`timing_${stage}`]) say(label, `timing_${stage}`);
      else show(label, stage);
      items.push(label, say(make("dd"), "ms", { ms: Number(ms).toFixed(1) }));
    }
    $("timings").replaceChildren(...items);
    const reasoning = response.reasoning;
    if (reasoning) {
      say($("reasoning-model"), "reasoning_model", {
        backend: reasoning.backend, model: reasoning.model, finish: reasoning.finish_reason,
        tokens: reasoning.completion_tokens,
      });
    } else show($("reasoning-model"), "");
    say($("request-id"), "request_id", { id: response.request_id });
    $("timings-box").hidden = false;
  }

  function renderResponse(response) {
    setAnswer(response.answer, response.language);
    $("replaced").hidden = !response.replaced;
    renderRoute(response.route);
    renderVision(response.vision);
    if (response.reasoning && response.reasoning.thinking && !$("thinking").textContent) {
      show($("thinking"), response.reasoning.thinking);
      $("thinking-box").hidden = false;
    }
    renderArbitration(response.arbitration);
    renderFlags(response);
    renderFailures(response.failures);
    renderTimings(response);
  }

  // ---- the event stream

  function parseEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
  }

  async function* serverSentEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
    }
  }

  // Shows each event as it comes; says how the stream ended: "done", "error" (an error that ends it) or "cut".
  async function consume(body) {
    for await (const { name, data } of serverSentEvents(body)) {
      if (name === "route") renderRoute(data);
      else if (name === "vision") {
        renderVision(data);
        say($("status"), "status_vision");
      } else if (name === "reasoning") appendDelta(data);
      else if (name === "arbitration") {
        renderArbitration(data);
        if (data.replaced) setAnswer(data.answer);
      } else if (name === "error") {
        const { error, failure } = data;
        showError({
          titleKey: failure ? "error_stage" : "error_stream", type: error.type, message: error.message,
          requestId: error.request_id, stage: Boolean(failure),
        });
        if (!failure) return "error";
      } else if (name === "done") {
        renderResponse(data);
        return "done";
      }
    }
    return "cut";
  }

  // ---- asking

  function setRunning(running) {
    $("submit").disabled = running;
    $("stop").disabled = !running;
    $("result").setAttribute("aria-busy", running ? "true" : "false");
  }

  function requestHeaders() {
    const headers = { Accept: "text/event-stream" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  function requestBody(question) {
    const form = new FormData();
    form.append("image", chosenFile, chosenFile.name || "image");
    form.append("question", question);
    form.append("mode", $("mode").value);
    form.append("profile", $("profile").value);
    form.append("stream", "true");
    return form;
  }

  function refuse(key, focus) {
    clearResult();
    showError({ titleKey: key });
    setState("error", "status_failed");
    focus.focus();
  }

  async function ask(event) {
    event.preventDefault();
    if (controller) return;
    const question = $("question").value.trim();
    if (!chosenFile) return refuse("error_need_image", $("image"));
    if (!question) return refuse("error_need_question", $("question"));
    clearResult();
    setState("running", "status_sending");
    controller = new AbortController();
    setRunning(true);
    let state = ["error", "status_failed"];
    try {
      const init = { method: "POST", body: requestBody(question), headers: requestHeaders(), signal: controller.signal };
      const response = await fetch("v1/analyze", init);
      if (!response.ok) await showHttpError(response);
      else if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        renderResponse(await response.json());
        state = ["done", "status_done"];
      } else {
        const ending = await consume(response.body);
        if (ending === "done") state = ["done", "status_done"];
        else if (ending === "cut") showError({ titleKey: "error_stream_cut" });
      }
    } catch (error) {
      if (error.name === "AbortError") state = ["stopped", "status_stopped"];
      else showError({ titleKey: "error_network", message: String(error.message || error) });
    } finally {
      controller = null;
      setRunning(false);
      setState(...state);
    }
  }

  function wireForm() {
    $("ask").addEventListener("submit", ask);
    $("stop").addEventListener("click", () => controller && controller.abort());
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask").requestSubmit();
    });
    const key = $("api-key");
    key.value = sessionStorage.getItem(API_KEY_KEY) || "";
    if (key.value) $("key-box").open = true;
    key.addEventListener("input", () => {
      if (key.value.trim()) sessionStorage.setItem(API_KEY_KEY, key.value.trim());
      else sessionStorage.removeItem(API_KEY_KEY);
    });
    $("lang-toggle").addEventListener("click", switchLanguage);
  }

  wireImagePicking();
  wireForm();
  applyLanguage();
})();
