// attnlab: keys that move the selected head (the app's KEY_STEP store; the callbacks do the rest), and the
// clientside helpers the app registers (hide a graph while it has nothing to draw; the light / dark theme).
(function () {
  var STEPS = {
    ArrowRight: "head+1", l: "head+1",
    ArrowLeft: "head-1", h: "head-1",
    ArrowDown: "layer+1", j: "layer+1",
    ArrowUp: "layer-1", k: "layer-1",
  };
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey || !t) return;
    if (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName)) return;
    if (t.closest && t.closest("[role=listbox],[role=combobox],.ag-root-wrapper,.dash-dropdown")) return;
    var step = STEPS[e.key];
    if (!step || !window.dash_clientside || !window.dash_clientside.set_props) return;
    e.preventDefault();
    window.dash_clientside.set_props("key-step", { data: { step: step, t: Date.now() } });
  });

  function emptyFigure(fig) {
    return !fig || !fig.data || fig.data.length === 0;
  }

  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    attnlab: {
      // -> [graph style, hint]: an empty figure hides its graph and its message (or the default) becomes the hint
      shown: function (fig, hint, style) {
        if (emptyFigure(fig)) {
          var anns = (fig && fig.layout && fig.layout.annotations) || [];
          var msg = fig ? (anns.length ? anns[0].text : "") : hint;
          return [Object.assign({}, style, { display: "none" }), msg || ""];
        }
        return [Object.assign({}, style, { display: "block" }), ""];
      },
      // the view's query string (the same as attnlab.apps.callbacks.shell.view_query); no_update when unchanged
      query: function (values, current) {
        var keys = ["run", "result", "head", "prompt", "tab", "compare", "x", "y"];
        var parts = [];
        values.forEach(function (v, i) {
          if (keys[i] === "head") {
            v = v && typeof v === "object" && "layer" in v ? "L" + v.layer + "H" + v.head : null;
          }
          if (v !== null && v !== undefined && v !== "") {
            parts.push(encodeURIComponent(keys[i]) + "=" + encodeURIComponent(v).replace(/%20/g, "+"));
          }
        });
        var search = "?" + parts.join("&");
        return search === (current || "") ? window.dash_clientside.no_update : search;
      },
      // the selected head after a key or a step button, in the browser so that quick presses all count (the same
      // rule as attnlab.apps.callbacks.headmap.step_head; a browser test checks they agree)
      step: function (key, n1, n2, n3, n4, current, shape) {
        var ctx = window.dash_clientside.callback_context;
        var fired = (ctx.triggered && ctx.triggered.length ? ctx.triggered[0].prop_id : "").split(".")[0];
        var buttons = { "head-next": "head+1", "head-prev": "head-1", "layer-next": "layer+1", "layer-prev": "layer-1" };
        var step = fired === "key-step" ? key && key.step : buttons[fired];
        if (!step || !shape || shape[0] <= 0 || shape[1] <= 0) return window.dash_clientside.no_update;
        var L = shape[0], H = shape[1];
        if (!current || current.layer === undefined) return { layer: 0, head: 0 };
        if (step === "head+1" || step === "head-1") {
          var flat = current.layer * H + current.head + (step === "head+1" ? 1 : -1);
          flat = Math.min(Math.max(0, flat), L * H - 1);
          return { layer: Math.floor(flat / H), head: flat % H };
        }
        var layer = Math.min(Math.max(0, current.layer + (step === "layer+1" ? 1 : -1)), L - 1);
        return { layer: layer, head: Math.min(current.head, H - 1) };
      },
      theme: function (dark) {
        var mode = dark ? "dark" : "light";
        document.documentElement.setAttribute("data-ag-theme-mode", mode);
        document.body.setAttribute("data-ag-theme-mode", mode);
        return mode;
      },
    },
  });
})();
