// @ts-check
/** `/activity/`: the live user activity stream (staff only). */
import { followActivity } from "./activity-feed.js";
import { onRebuild, pageData, showNotice, startLive } from "./live.js";

const data = pageData();
const client = startLive();
// Replayed records arrive like live ones; lost ones (the server could not replay them) are said.
onRebuild(client, "user_activity", () => showNotice("Reconnected. Activity recorded while this page was offline is not shown here.",
  { kind: "warn", key: "reconnected", action: { text: "Reload", run: () => location.reload() } }));

followActivity(client, {
  tbody: /** @type {HTMLTableSectionElement} */ (document.getElementById("activity-rows")),
  empty: /** @type {HTMLElement} */ (document.getElementById("activity-empty")),
  compact: false,
  data,
});
