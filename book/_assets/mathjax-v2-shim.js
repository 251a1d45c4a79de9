// The Jupyter widget manager (@jupyter-widgets/html-manager 1.x) typesets widget labels with the
// MathJax 2 call `MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])`, but this book loads
// MathJax 3, which has no `Hub`: the call threw "Cannot read properties of undefined (reading
// 'Queue')". This script runs after Sphinx's `window.MathJax = {...}` configuration and before
// MathJax 3 itself (loaded with `defer`); it maps that one MathJax 2 call onto MathJax 3's
// `typesetPromise`, both before MathJax has started (on the configuration object) and after.
(function () {
  "use strict";
  let markReady;
  const ready = new Promise((resolve) => { markReady = resolve; });
  const hub = {
    // Like MathJax 2's queue, jobs run one after another; `promise` settles when all are done.
    promise: ready,
    Queue(...jobs) {
      for (const job of jobs) {
        if (Array.isArray(job) && job[0] === "Typeset") {
          const element = job[2];
          hub.promise = hub.promise
            .then(() => window.MathJax.typesetPromise(element ? [element] : undefined))
            .catch((err) => console.error("MathJax typeset failed:", err));
        }
      }
    },
  };
  const config = window.MathJax || {};
  config.startup = config.startup || {};
  const userReady = config.startup.ready;
  config.startup.ready = function () {
    if (userReady) {
      userReady();
    } else {
      window.MathJax.startup.defaultReady();
    }
    window.MathJax.Hub = hub;
    window.MathJax.startup.promise.then(markReady);
  };
  config.Hub = hub;
  window.MathJax = config;
})();
