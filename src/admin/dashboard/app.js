// omniq dashboard: confirmed actions (POST to the JSON API with the page's CSRF token) and
// periodic refresh. No inline script anywhere: the Content-Security-Policy forbids it.
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrf = meta ? meta.getAttribute("content") : "";
  var flash = document.getElementById("flash");
  var busy = false;

  function show(text, bad) {
    if (!flash) return;
    flash.textContent = text; // textContent: never interpreted as HTML
    flash.className = bad ? "bad" : "ok";
  }

  document.addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-url]");
    if (!b) return;
    ev.preventDefault();
    var body = b.getAttribute("data-body") || "{}";
    var confirmText = b.getAttribute("data-confirm") || "Are you sure?";
    var ageFrom = b.getAttribute("data-age-from");
    if (ageFrom) {
      var age = (document.getElementById(ageFrom) || {}).value || "";
      body = JSON.stringify({ older_than: age });
      confirmText = confirmText + " (older than " + age + ")";
    }
    if (!window.confirm(confirmText)) return;
    busy = true;
    b.disabled = true;
    fetch(b.getAttribute("data-url"), {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body
    })
      .then(function (r) {
        return r.json().then(function (j) { return { ok: r.ok, body: j }; });
      })
      .then(function (res) {
        if (res.ok) {
          show("Done.", false);
          window.location.reload();
        } else {
          show((res.body.error && res.body.error.message) || "The action failed.", true);
          b.disabled = false;
          busy = false;
        }
      })
      .catch(function (e) {
        show("The action failed: " + e, true);
        b.disabled = false;
        busy = false;
      });
  });

  var every = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (every > 0) {
    setInterval(function () {
      var typing = document.activeElement && document.activeElement.tagName === "INPUT";
      if (!busy && !typing) window.location.reload();
    }, every);
  }
})();
