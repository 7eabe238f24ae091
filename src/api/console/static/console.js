// loraplex console: live curves. Everything else works without this script.
// On a run page, listens to the run's server-sent events and, at most once a second,
// swaps in freshly rendered curves and prepends the new points to the table.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  var status = document.getElementById("live-status");
  var say = function (t) { if (status) status.textContent = t; };
  var pending = false, busy = false;
  function refresh() {
    if (busy) { pending = true; return; }
    busy = true; pending = false;
    fetch(live.dataset.charts, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var old = document.getElementById("charts");
        var tmp = document.createElement("div");
        tmp.innerHTML = html;
        var fresh = tmp.querySelector("#charts");
        if (old && fresh) old.replaceWith(fresh);
      })
      .catch(function () { say("Live update failed; reload the page."); })
      .finally(function () {
        busy = false;
        if (pending) setTimeout(refresh, 1000);
      });
  }
  function addRow(p) {
    var body = document.querySelector("#points tbody");
    if (!body) return;
    var tr = document.createElement("tr");
    var metrics = Object.keys(p.metrics).map(function (k) {
      var v = Number(p.metrics[k]);
      return k + "=" + (Number.isInteger(v) ? String(v) : v.toPrecision(4));
    }).join(", ");
    var time = String(p.time).replace("T", " ").replace("Z", " UTC");
    [String(p.step), p.kind, metrics, time].forEach(function (v) {
      var td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    });
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > 10) body.deleteRow(body.rows.length - 1);
    if (p.kind === "optim_step") {
      var step = document.getElementById("run-step");
      if (step) step.textContent = String(p.step);
    }
  }
  var timer = null;
  var es = new EventSource(live.dataset.events);
  es.addEventListener("open", function () { say("Live: new points appear as the run trains."); });
  es.addEventListener("point", function (e) {
    try { addRow(JSON.parse(e.data)); } catch (_) { /* a malformed point is skipped */ }
    if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, 1000);
  });
  es.addEventListener("reload", function () { refresh(); });
  es.addEventListener("error", function () { say("Live updates paused; retrying."); });
})();
