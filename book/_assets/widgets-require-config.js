// Loaded between require.js and the widget manager's bundle (embed-amd.js) on pages with widgets.
// The bundle names its AMD modules "@jupyter-widgets/...", and finds its icon fonts next to where
// require.js says those modules live; by default that is the page's own folder, where the fonts
// 404. Point require.js at the copy served from _static/vendor/html-manager/dist/. Widget modules the
// bundle lacks (third-party widget libraries) are looked up in _static/vendor/widget-modules/,
// on this site, never on a CDN (the bundle's script tag sets data-jupyter-widgets-cdn="./").
(function () {
  "use strict";
  const here = document.currentScript.src;
  const dist = new URL("vendor/html-manager/dist/", here).href;
  // Each module of the bundle finds its assets next to its own URL: map every one into dist/.
  const bundled = ["html-manager", "base", "base7", "controls", "controls7", "output"];
  const paths = { "@jupyter-widgets/html-manager/dist/libembed-amd": dist + "libembed-amd" };
  for (const name of bundled) paths[`@jupyter-widgets/${name}`] = dist + name;
  window.requirejs.config({ baseUrl: new URL("vendor/widget-modules/", here).href, paths });
})();
