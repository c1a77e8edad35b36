// Analytics (public): supply against demand, price trends and cluster statistics, from the
// history in Postgres (`/api/analytics/market/...`, `/api/clusters`).
import { html, render, useMemo, useState } from "./ui.js";
import { gb, get, price } from "./api.js";
import { ErrorBox, useLoad } from "./components.js";
import { TimePlot, align, seconds } from "./charts.js";

const RANGES = {
  "5m": { label: "last 24 hours, 5-minute buckets", range_s: 86400 },
  "1h": { label: "last 7 days, hourly", range_s: 7 * 86400 },
  "1d": { label: "last 90 days, daily", range_s: 90 * 86400 },
};

function sumBy(buckets, value) {
  const sums = new Map();
  buckets.forEach((b) => sums.set(seconds(b.start), (sums.get(seconds(b.start)) || 0) + value(b)));
  return [...sums.entries()].map(([t, v]) => ({ t, v }));
}

function Supply({ supply, span }) {
  const capacity = useMemo(() => {
    const { times, values } = align([
      sumBy(supply.buckets, (b) => b.offered_ram_gb + b.offered_vram_gb),
      sumBy(supply.buckets, (b) => b.reserved_ram_gb + b.reserved_vram_gb),
    ]);
    return { times, series: [{ label: "offered GB", values: values[0] }, { label: "leased GB", values: values[1] }] };
  }, [supply]);
  const demand = useMemo(() => {
    const { times, values } = align([
      sumBy(supply.buckets, (b) => b.bid_ram_gb + b.bid_vram_gb),
      sumBy(supply.buckets, (b) => b.filled_ram_gb + b.filled_vram_gb),
    ]);
    return { times, series: [{ label: "GB bid", values: values[0] }, { label: "GB filled", values: values[1] }] };
  }, [supply]);
  const fmt = (v) => `${Math.round(v).toLocaleString("en-US")} GB`;
  return html`<section class="panel" id="supply" aria-labelledby="supply-title">
    <h2 id="supply-title">Supply and demand</h2>
    ${capacity.times.length ? html`<${TimePlot} span=${span} id="capacity-chart" title="Capacity offered and leased (GB, RAM + VRAM)"
      times=${capacity.times} series=${capacity.series} format=${fmt} />` : html`<p>No heartbeats in this period.</p>`}
    ${demand.times.length ? html`<${TimePlot} span=${span} id="demand-chart" title="Demand: GB bid and GB filled per bucket"
      times=${demand.times} series=${demand.series} format=${fmt} bars=${true} />` : html`<p>No bids or fills in this period.</p>`}
    <h3>Now</h3>
    <table class="data" id="supply-now" aria-label="Supply and demand now, per region">
      <thead><tr><th scope="col">Region</th><th scope="col">Active nodes</th><th scope="col">Offered RAM</th>
        <th scope="col">Leased RAM</th><th scope="col">Offered VRAM</th><th scope="col">Leased VRAM</th>
        <th scope="col">Resting bids</th><th scope="col">GB bid</th></tr></thead>
      <tbody>${supply.current.map((r) => html`<tr key=${r.region}><th scope="row">${r.region}</th>
        <td class="num">${r.active_nodes}</td><td class="num">${gb(r.offered_ram_gb)}</td>
        <td class="num">${gb(r.reserved_ram_gb)}</td><td class="num">${gb(r.offered_vram_gb)}</td>
        <td class="num">${gb(r.reserved_vram_gb)}</td><td class="num">${r.resting_bids}</td>
        <td class="num">${gb(r.resting_bid_ram_gb + r.resting_bid_vram_gb)}</td></tr>`)}</tbody></table>
  </section>`;
}

function Prices({ pricing, span }) {
  const chart = useMemo(() => {
    const byRegion = new Map();
    pricing.candles.forEach((c) => {
      if (!byRegion.has(c.region)) byRegion.set(c.region, []);
      byRegion.get(c.region).push(c);
    });
    // The eight busiest regions by fills, each its volume-weighted average price.
    const regions = [...byRegion.entries()]
      .sort((a, b) => b[1].reduce((s, c) => s + c.fills, 0) - a[1].reduce((s, c) => s + c.fills, 0))
      .slice(0, 8);
    const { times, values } = align(regions.map(([, cs]) => cs.map((c) => ({ t: seconds(c.start), v: c.vwap }))));
    return { times, series: regions.map(([r], i) => ({ label: r, values: values[i] })) };
  }, [pricing]);
  return html`<section class="panel" id="prices" aria-labelledby="prices-title">
    <h2 id="prices-title">Price trends</h2>
    ${chart.times.length ? html`<${TimePlot} span=${span} id="price-chart" title="Volume-weighted cleared price (USD per GB·s)"
      times=${chart.times} series=${chart.series} format=${price} zero=${false} />` : html`<p>No fills in this period.</p>`}
  </section>`;
}

function Clusters({ clusters }) {
  return html`<section class="panel" id="clusters" aria-labelledby="clusters-title">
    <h2 id="clusters-title">Clusters</h2>
    <table class="data" id="cluster-table" aria-label="Cluster statistics">
      <thead><tr><th scope="col">Region</th><th scope="col">Nodes (active / all)</th>
        <th scope="col">Datacenter · edge · mist</th><th scope="col">RAM free / total</th>
        <th scope="col">VRAM free / total</th><th scope="col">Average ask /GB·s</th></tr></thead>
      <tbody>${clusters.map((c) => html`<tr key=${c.region}><th scope="row">${c.region}</th>
        <td class="num">${c.active_nodes} / ${c.total_nodes}</td>
        <td>${c.node_composition.datacenter} · ${c.node_composition.edge_cluster} · ${c.node_composition.mist_node}</td>
        <td class="num">${c.available_ram_gb.toLocaleString("en-US")} / ${gb(c.total_ram_gb)}</td>
        <td class="num">${c.available_vram_gb.toLocaleString("en-US")} / ${gb(c.total_vram_gb)}</td>
        <td class="num">${price(c.avg_price_per_gb_sec)}</td></tr>`)}</tbody></table>
  </section>`;
}

function Analytics() {
  const [bucket, setBucket] = useState("5m");
  const [region, setRegion] = useState("");
  const [clusters, clustersError] = useLoad(() => get("/api/clusters"));
  const [data, error] = useLoad(async () => {
    const query = { bucket, start: new Date(Date.now() - RANGES[bucket].range_s * 1000).toISOString(), region };
    const [supply, pricing] = await Promise.all([
      get("/api/analytics/market/supply", query),
      get("/api/analytics/market/pricing", query),
    ]);
    return { supply, pricing };
  }, [bucket, region]);
  return html`<div class="page-head"><h1>Analytics</h1>
      <label class="inline">Period <select value=${bucket} onChange=${(e) => setBucket(e.target.value)}>
        ${Object.entries(RANGES).map(([k, r]) => html`<option value=${k}>${r.label}</option>`)}</select></label>
      <label class="inline">Region <select value=${region} onChange=${(e) => setRegion(e.target.value)}>
        <option value="">all</option>
        ${(clusters ? clusters.clusters : []).map((c) => html`<option value=${c.region}>${c.region}</option>`)}
      </select></label></div>
    <${ErrorBox} error=${error || clustersError} />
    ${data ? html`<${Supply} supply=${data.supply} span=${RANGES[bucket].range_s} /><${Prices} pricing=${data.pricing} span=${RANGES[bucket].range_s} />` : html`<p class="loading">Loading…</p>`}
    ${clusters && html`<${Clusters} clusters=${clusters.clusters} />`}`;
}

export function mount(main) {
  render(html`<${Analytics} />`, main);
}
