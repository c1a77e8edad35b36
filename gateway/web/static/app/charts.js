// uPlot time series (node earnings, supply and demand, price trends), sized to their box.
import { html, useEffect, useRef } from "./ui.js";

const COLORS = ["#1d4ed8", "#15803d", "#b91c1c", "#a16207", "#7c3aed", "#0e7490", "#be185d", "#4d7c0f"];

// `series`: [{label, values}] sharing `times` (Unix seconds), drawn over `span` seconds up to
// now (the period asked for, however few points fell in it). `format` labels the y axis.
// The y axis starts at zero unless `zero` is false (prices).
export function TimePlot({ id, title, times, series, span, format = (v) => String(v), bars = false, zero = true }) {
  const box = useRef(null);
  useEffect(() => {
    const width = Math.max(320, box.current.clientWidth);
    const plot = new uPlot(
      {
        width,
        height: 240,
        title,
        scales: {
          x: { time: true, range: () => [Date.now() / 1000 - span, Date.now() / 1000] },
          ...(zero ? { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } } : {}),
        },
        axes: [{}, { values: (u, ticks) => ticks.map(format), size: 110 }],
        series: [
          {},
          ...series.map((s, i) => ({
            label: s.label,
            stroke: COLORS[i % COLORS.length],
            fill: bars ? COLORS[i % COLORS.length] + "55" : undefined,
            width: 2,
            paths: bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
            value: (u, v) => (v === null || v === undefined ? "–" : format(v)),
          })),
        ],
      },
      [times, ...series.map((s) => s.values)],
      box.current,
    );
    return () => plot.destroy();
  }, [times, series, span]);
  return html`<div ref=${box} id=${id} class="plot" role="img"
    aria-label=${`${title}: ${times.length} points`} data-points=${times.length}></div>`;
}

// Buckets of several series (each [{start, value}]) on one time axis; missing points are null.
export function align(seriesBuckets) {
  const times = [...new Set(seriesBuckets.flatMap((b) => b.map((p) => p.t)))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const values = seriesBuckets.map((b) => {
    const out = new Array(times.length).fill(null);
    b.forEach((p) => (out[index.get(p.t)] = p.v));
    return out;
  });
  return { times, values };
}

export function seconds(iso) {
  return Date.parse(iso) / 1000;
}
