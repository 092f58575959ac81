// Skylift dashboard: live regions by short polling, the live device count of
// the deployment form, and confirmations before irreversible actions.
// Written for this repository; no library. Every page works without it.
"use strict";

(function () {
  // -- live regions: <div data-live="/url" data-interval="ms"> -----------------
  // Bounded: one request in flight per region, a timeout per request, and a
  // back-off after errors; nothing is fetched while the tab is hidden.
  var REQUEST_TIMEOUT_MS = 10000;
  var MAX_BACKOFF_MS = 60000;

  function statusLine(text) {
    var el = document.querySelector("[data-live-status]");
    if (el) el.textContent = text;
  }

  function startLive(region) {
    if (region.hasAttribute("data-paused")) return;
    var url = region.getAttribute("data-live");
    var interval = parseInt(region.getAttribute("data-interval"), 10) || 2000;
    var delay = interval;
    var last = null;

    function schedule() { window.setTimeout(tick, delay); }

    function tick() {
      if (document.hidden) { schedule(); return; }
      // A form being filled in inside the region would lose its input.
      var active = document.activeElement;
      if (active && region.contains(active) && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName) && active.value) {
        schedule();
        return;
      }
      var controller = new AbortController();
      var timer = window.setTimeout(function () { controller.abort(); }, REQUEST_TIMEOUT_MS);
      fetch(url, { credentials: "same-origin", signal: controller.signal, headers: { "Accept": "text/html" } })
        .then(function (response) {
          if (response.status === 401) {
            statusLine("Your session has ended: reload the page to log in again.");
            return null;
          }
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.text();
        })
        .then(function (html) {
          window.clearTimeout(timer);
          if (html === null) return;  // logged out: stop polling
          if (html !== last) {
            region.innerHTML = html;
            last = html;
            bindConfirm(region);
          }
          region.setAttribute("data-updated", String(Date.now()));
          statusLine("Live: updated " + new Date().toLocaleTimeString() + ".");
          delay = interval;
          schedule();
        })
        .catch(function (error) {
          window.clearTimeout(timer);
          statusLine("Live updates interrupted (" + error.message + "); retrying.");
          delay = Math.min(delay * 2, MAX_BACKOFF_MS);
          schedule();
        });
    }
    schedule();
  }

  // -- confirmations: <form data-confirm="question"> ----------------------------
  function bindConfirm(root) {
    var forms = root.querySelectorAll("form[data-confirm]");
    for (var i = 0; i < forms.length; i++) {
      if (forms[i].hasAttribute("data-bound")) continue;
      forms[i].setAttribute("data-bound", "");
      forms[i].addEventListener("submit", function (event) {
        if (!window.confirm(event.currentTarget.getAttribute("data-confirm"))) event.preventDefault();
      });
    }
  }

  // -- the deployment form's live count ------------------------------------------
  function startCount(form) {
    var output = form.querySelector("[data-count-output]");
    var fields = form.querySelectorAll("[data-count]");
    var url = form.getAttribute("data-count-url");
    var timer = null;
    var seq = 0;

    function update() {
      var params = new URLSearchParams();
      for (var i = 0; i < fields.length; i++) {
        if (fields[i].value) params.set(fields[i].name, fields[i].value);
      }
      if (!params.get("release")) {
        output.textContent = "Choose a release to count the matching devices.";
        return;
      }
      var mine = ++seq;
      output.textContent = "Counting…";
      fetch(url + "?" + params.toString(), { credentials: "same-origin" })
        .then(function (response) { return response.json(); })
        .then(function (doc) {
          if (mine !== seq) return;  // a newer count is on its way
          output.textContent = doc.error ? doc.error : doc.text;
          output.setAttribute("data-matched", doc.error ? "" : String(doc.matched));
        })
        .catch(function () { if (mine === seq) output.textContent = "Could not count the devices."; });
    }

    for (var i = 0; i < fields.length; i++) {
      fields[i].addEventListener("input", function () {
        window.clearTimeout(timer);
        timer = window.setTimeout(update, 300);
      });
      fields[i].addEventListener("change", update);
    }
    update();
  }

  document.addEventListener("DOMContentLoaded", function () {
    bindConfirm(document);
    var regions = document.querySelectorAll("[data-live]");
    for (var i = 0; i < regions.length; i++) startLive(regions[i]);
    var countForms = document.querySelectorAll("form[data-count-url]");
    for (var j = 0; j < countForms.length; j++) startCount(countForms[j]);
  });
})();
