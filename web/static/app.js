// Keep each live stream's URL at the last event it delivered. The browser's own reconnects send
// Last-Event-ID, but when the SSE extension re-opens a closed stream it builds a fresh
// EventSource from the sse-connect attribute, which carries no Last-Event-ID: without this it
// would resume from the page's first position and repeat the streamed text since.
document.addEventListener("htmx:sseMessage", function (event) {
  var id = event.detail && event.detail.lastEventId;
  var source = event.target.closest && event.target.closest("[sse-connect]");
  if (!id || !source) return;
  var url = new URL(source.getAttribute("sse-connect"), window.location.href);
  url.searchParams.set("after", id);
  source.setAttribute("sse-connect", url.pathname + url.search);
});

// Say whether a live stream is connected (CSS shows it; tests wait for it).
document.addEventListener("htmx:sseOpen", function (event) {
  event.target.setAttribute("data-live", "open");
});
document.addEventListener("htmx:sseError", function (event) {
  event.target.setAttribute("data-live", "reconnecting");
});
document.addEventListener("htmx:sseClose", function (event) {
  event.target.setAttribute("data-live", "closed");
});
