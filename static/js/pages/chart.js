// @ts-check
/**
 * A small time-series line chart drawn on a `<canvas>`: several named series over a
 * sliding time window, a fixed or automatic value range, grid lines with labels, an
 * optional dashed reference line, and an HTML legend with each series' latest value.
 */

/**
 * One line of the chart: `points` are `[epoch ms, value]`, oldest first.
 * @typedef {{label: string, colorVar: string, points: [number, number][],
 *            legendValue: HTMLSpanElement}} Series
 */
/** @typedef {{value: number, label: string}} Reference */
/** The plot area in CSS pixels. @typedef {{x0: number, y0: number, x1: number, y1: number}} Box */
/** The time axis (epoch ms) and the top of the value axis. @typedef {{start: number, end: number, top: number}} Scale */
/** Maps a time or a value to a pixel coordinate. @typedef {(n: number) => number} ToPixel */

const PADDING = { top: 10, right: 12, bottom: 22, left: 44 };
/** Points further apart than this are not joined: the host did not report in between. */
const MAX_GAP_MS = 150_000;

/**
 * A CSS custom property of the document (colours follow the light or dark theme).
 * @param {string} name
 */
function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
}

/**
 * A round step for about `count` grid lines between 0 and `max`.
 * @param {number} max
 * @param {number} count
 */
function niceStep(max, count) {
  const raw = max / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  return step || raw;
}

export class LineChart {
  /**
   * @param {HTMLElement} figure a `<figure>` that holds a `<canvas>`, a `[data-legend]` list
   *   and optionally a `[data-latest]` element
   * @param {{max?: number|null, unit?: string, digits?: number, windowMs?: number,
   *          label: string, reference?: Reference|null}} options
   *   `max`: top of the value axis (null: from the data); `label`: what is charted, for
   *   the canvas's text alternative
   */
  constructor(figure, { max = 100, unit = "%", digits = 1, windowMs = 3_600_000, label, reference = null }) {
    this.canvas = /** @type {HTMLCanvasElement} */ (figure.querySelector("canvas"));
    this.legend = /** @type {HTMLElement} */ (figure.querySelector("[data-legend]"));
    /** @type {HTMLElement|null} */
    this.latestText = figure.querySelector("[data-latest]");
    this.max = max;
    this.unit = unit;
    this.digits = digits;
    this.windowMs = windowMs;
    this.label = label;
    this.reference = reference;
    /** @type {Map<string, Series>} */
    this.series = new Map(); // name -> {label, colorVar, points: [[t, v]], legendValue}
    /** @type {number|null} */
    this.frame = null;
    new ResizeObserver(() => this.draw()).observe(this.canvas);
    setInterval(() => this.draw(), 10_000); // the window slides even when nothing arrives
  }

  /**
   * Add a point to series `name` (created on first use, in order, with the next colour).
   * @param {string} name
   * @param {number} time epoch ms
   * @param {unknown} value ignored unless a finite number
   */
  add(name, time, value, label = name) {
    if (typeof value !== "number" || !Number.isFinite(value) || !Number.isFinite(time)) return;
    let series = this.series.get(name);
    if (!series) {
      // legendValue: added by addLegendItem
      series = /** @type {Series} */ ({ label, colorVar: `--series-${(this.series.size % 6) + 1}`, points: /** @type {[number, number][]} */ ([]) });
      this.series.set(name, series);
      this.addLegendItem(series);
    }
    const points = series.points;
    if (points.length === 0 || time >= points[points.length - 1][0]) points.push([time, value]);
    else points.splice(points.findIndex(([t]) => t > time), 0, [time, value]); // late history
    const cutoff = Date.now() - this.windowMs - 60_000;
    while (points.length && points[0][0] < cutoff) points.shift();
    this.schedule();
  }

  /** Redraw at the next animation frame (many points may arrive together). */
  schedule() {
    if (this.frame === null) this.frame = requestAnimationFrame(() => { this.frame = null; this.draw(); });
  }

  /** @param {number} value */
  format(value) {
    return `${value.toLocaleString(undefined, { maximumFractionDigits: this.digits, minimumFractionDigits: this.digits })}${this.unit ? ` ${this.unit}` : ""}`;
  }

  /** @param {Series} series */
  addLegendItem(series) {
    series.legendValue = document.createElement("span");
    series.legendValue.className = "legend-value";
    const swatch = document.createElement("span");
    swatch.className = "legend-swatch";
    swatch.style.background = `var(${series.colorVar})`;
    const item = document.createElement("li");
    item.append(swatch, series.label, " ", series.legendValue);
    this.legend.append(item);
  }

  /** Latest values in the legend, the caption and the canvas's text alternative. */
  updateText() {
    const parts = [];
    for (const series of this.series.values()) {
      const last = series.points[series.points.length - 1];
      const text = last ? this.format(last[1]) : "—";
      series.legendValue.textContent = text;
      parts.push(this.series.size > 1 ? `${series.label} ${text}` : text);
    }
    const summary = parts.join(", ");
    if (this.latestText) this.latestText.textContent = this.series.size === 1 ? summary : "";
    this.canvas.setAttribute("aria-label", parts.length
      ? `${this.label} over the last hour; latest: ${summary}` : `${this.label}: no data yet`);
  }

  /** The top of the value axis. */
  top() {
    if (this.max !== null) return this.max;
    let highest = this.reference?.value ?? 0;
    for (const series of this.series.values()) for (const [, v] of series.points) highest = Math.max(highest, v);
    const step = niceStep(Math.max(highest * 1.1, 1), 4);
    return Math.ceil(Math.max(highest * 1.1, 1) / step) * step;
  }

  /** Draw everything, sized to the canvas's CSS box at the device's pixel ratio. */
  draw() {
    const { canvas } = this;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d"));
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const now = Date.now();
    const box = { x0: PADDING.left, y0: PADDING.top, x1: width - PADDING.right, y1: height - PADDING.bottom };
    const scale = { start: now - this.windowMs, end: now, top: this.top() };
    /** @type {ToPixel} */
    const x = (t) => box.x0 + ((t - scale.start) / (scale.end - scale.start)) * (box.x1 - box.x0);
    /** @type {ToPixel} */
    const y = (v) => box.y1 - (Math.min(v, scale.top) / scale.top) * (box.y1 - box.y0);
    this.drawGrid(ctx, box, scale, x, y);
    if (this.reference) this.drawReference(ctx, box, x, y);
    ctx.save();
    ctx.beginPath();
    ctx.rect(box.x0, box.y0 - 4, box.x1 - box.x0 + 4, box.y1 - box.y0 + 8);
    ctx.clip();
    for (const series of this.series.values()) this.drawSeries(ctx, series, x, y);
    ctx.restore();
    if (![...this.series.values()].some((s) => s.points.length)) this.drawEmpty(ctx, box);
    this.updateText();
  }

  /**
   * @param {CanvasRenderingContext2D} ctx
   * @param {Box} box
   * @param {Scale} scale
   * @param {ToPixel} x
   * @param {ToPixel} y
   */
  drawGrid(ctx, box, scale, x, y) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = cssVar("--muted");
    ctx.strokeStyle = cssVar("--grid");
    ctx.lineWidth = 1;
    const step = niceStep(scale.top, 4);
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = 0; v <= scale.top + 1e-9; v += step) {
      const py = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(box.x0, py);
      ctx.lineTo(box.x1, py);
      ctx.stroke();
      ctx.fillText(`${Number(v.toFixed(2))}${this.unit === "%" ? "%" : ""}`, box.x0 - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const quarter = 15 * 60_000;
    for (let t = Math.ceil(scale.start / quarter) * quarter; t <= scale.end; t += quarter) {
      const px = Math.round(x(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(px, box.y0);
      ctx.lineTo(px, box.y1);
      ctx.stroke();
      const label = new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
      ctx.fillText(label, Math.min(Math.max(px, box.x0 + 16), box.x1 - 16), box.y1 + 5);
    }
  }

  /**
   * @param {CanvasRenderingContext2D} ctx
   * @param {Box} box
   * @param {ToPixel} x
   * @param {ToPixel} y
   */
  drawReference(ctx, box, x, y) {
    const py = Math.round(y(/** @type {Reference} */ (this.reference).value)) + 0.5;
    ctx.save();
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = cssVar("--muted");
    ctx.beginPath();
    ctx.moveTo(box.x0, py);
    ctx.lineTo(box.x1, py);
    ctx.stroke();
    ctx.restore();
    ctx.textAlign = "left";
    ctx.textBaseline = "bottom";
    ctx.fillText(/** @type {Reference} */ (this.reference).label, box.x0 + 4, py - 2);
  }

  /**
   * @param {CanvasRenderingContext2D} ctx
   * @param {Series} series
   * @param {ToPixel} x
   * @param {ToPixel} y
   */
  drawSeries(ctx, series, x, y) {
    const { points } = series;
    if (!points.length) return;
    const color = cssVar(series.colorVar);
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    let previous = null;
    for (const [t, v] of points) {
      if (previous === null || t - previous > MAX_GAP_MS) ctx.moveTo(x(t), y(v));
      else ctx.lineTo(x(t), y(v));
      previous = t;
    }
    ctx.stroke();
    const [lt, lv] = points[points.length - 1];
    ctx.fillStyle = color;
    ctx.beginPath();
    ctx.arc(x(lt), y(lv), 3, 0, Math.PI * 2);
    ctx.fill();
  }

  /**
   * @param {CanvasRenderingContext2D} ctx
   * @param {Box} box
   */
  drawEmpty(ctx, box) {
    ctx.fillStyle = cssVar("--muted");
    ctx.font = "13px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("No metrics yet: waiting for the agent to report", (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2);
  }
}
