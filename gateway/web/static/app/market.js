// The public market (no sign-in): the cluster map, and per region the order book, recent
// trades, price candles and 24 h volume, all kept live from /ws (`market`, `quotes:<region>`,
// `trades:<region>`).
import { html, render, useEffect, useMemo, useRef, useState } from "./ui.js";
import { clock, duration, gb, get, live, perFrame, price } from "./api.js";
import { ErrorBox, LiveBadge } from "./components.js";
import {
  CandlestickSeries,
  HistogramSeries,
  createChart,
} from "/static/vendor/lightweight-charts/lightweight-charts.standalone.production.mjs";

const INTERVALS = {
  "1m": { seconds: 60, range_s: 6 * 3600 },
  "5m": { seconds: 300, range_s: 24 * 3600 },
  "1h": { seconds: 3600, range_s: 7 * 86400 },
  "1d": { seconds: 86400, range_s: 180 * 86400 },
};
const TRADES_SHOWN = 30;

function since(seconds) {
  return new Date(Date.now() - seconds * 1000).toISOString();
}

// ------------------------------------------------------------------------------------------
// The map: countries from Natural Earth (world-atlas TopoJSON), no tile server; regions and
// nodes as circles sized by free capacity.

function radius(freeGb, scale, min, max) {
  return Math.max(min, Math.min(max, Math.sqrt(Math.max(0, freeGb)) * scale));
}

// Natural Earth's rings that cross the antimeridian jump from +180 to -180; on a flat map that
// draws a line across the world. Make each ring continuous (it may then pass 180 degrees).
function unwrap(geometry) {
  const rings =
    geometry.type === "Polygon" ? geometry.coordinates : geometry.type === "MultiPolygon" ? geometry.coordinates.flat() : [];
  for (const ring of rings) {
    for (let i = 1; i < ring.length; i++) {
      const step = ring[i][0] - ring[i - 1][0];
      if (step > 180) ring[i][0] -= 360;
      else if (step < -180) ring[i][0] += 360;
    }
  }
}

function ClusterMap({ clusters, summaries, nodes, region, onSelect }) {
  const box = useRef(null);
  const map = useRef(null);
  useEffect(() => {
    const m = L.map(box.current, {
      preferCanvas: true,
      worldCopyJump: true,
      minZoom: 1,
      maxZoom: 9,
      zoomSnap: 0.5,
    }).setView([30, 0], 1.5);
    m.attributionControl.addAttribution("Borders: Natural Earth (world-atlas)");
    const layers = { regions: L.layerGroup().addTo(m), nodes: L.layerGroup().addTo(m) };
    map.current = { m, layers };
    get("/static/vendor/world-atlas/countries-110m.json").then((topo) => {
      const land = topojson.feature(topo, topo.objects.countries);
      land.features = land.features.filter((f) => f.properties.name !== "Antarctica");
      land.features.forEach((f) => unwrap(f.geometry));
      L.geoJSON(land, {
        interactive: false,
        style: { color: "#94a3b8", weight: 0.6, fillColor: "#e2e8f0", fillOpacity: 1 },
      }).addTo(m).bringToBack();
    });
    return () => m.remove();
  }, []);
  useEffect(() => {
    const { layers } = map.current;
    layers.nodes.clearLayers();
    for (const n of nodes) {
      if (n.lat === null || n.lng === null) continue;
      const free = n.available_ram_gb + n.available_vram_gb;
      L.circleMarker([n.lat, n.lng], {
        radius: radius(free, 0.6, 2, 9),
        color: "#0f766e",
        weight: 1,
        fillColor: "#14b8a6",
        fillOpacity: 0.5,
      })
        .bindTooltip(`${n.name} (${n.node_type}): ${free} GB free at ${price(n.price_per_gb_sec)}/GB·s`)
        .addTo(layers.nodes);
    }
  }, [nodes]);
  useEffect(() => {
    // Markers are kept and changed in place: re-creating them redraws the whole canvas (every
    // node) for each summary the `market` channel brings.
    const { layers } = map.current;
    const markers = map.current.markers || (map.current.markers = new Map());
    for (const c of clusters) {
      if (!c.center) continue;
      const s = summaries[c.region];
      const free = s ? s.available_ram_gb + s.available_vram_gb : c.available_ram_gb + c.available_vram_gb;
      const count = s ? s.nodes : c.active_nodes;
      const r = radius(free, 0.25, 6, 40);
      const chosen = c.region === region;
      const text = `${c.region}: ${count} nodes, ${free.toLocaleString("en-US")} GB free`;
      let m = markers.get(c.region);
      if (!m) {
        m = L.circleMarker([c.center.lat, c.center.lng], { radius: r, fillColor: "#3b82f6", fillOpacity: 0.15 })
          .bindTooltip(text)
          .on("click", () => onSelect(c.region))
          .addTo(layers.regions);
        markers.set(c.region, m);
      }
      if (m.getRadius() !== r) m.setRadius(r);
      if (m.chosen !== chosen) {
        m.chosen = chosen;
        m.setStyle({ color: chosen ? "#1d4ed8" : "#475569", weight: chosen ? 3 : 1.5 });
      }
      if (m.text !== text) {
        m.text = text;
        m.setTooltipContent(text);
      }
    }
  }, [clusters, summaries, region]);
  const drawn = clusters.filter((c) => c.center).map((c) => c.region).join(" ");
  return html`<div ref=${box} class="map" id="cluster-map" data-regions=${drawn}
    role="region" aria-label="Map of regions and nodes, sized by free capacity (arrow keys pan, + and - zoom)"></div>`;
}

function RegionTable({ clusters, summaries, region, onSelect }) {
  return html`<table class="data" aria-label="Regions">
    <thead><tr><th scope="col">Region</th><th scope="col">Nodes</th><th scope="col">Free RAM</th>
      <th scope="col">Free VRAM</th><th scope="col">Best ask /GB·s</th></tr></thead>
    <tbody>${clusters.map((c) => {
      const s = summaries[c.region];
      return html`<tr key=${c.region} class=${c.region === region ? "selected" : ""}>
        <th scope="row"><button type="button" class="link" aria-pressed=${c.region === region}
          onClick=${() => onSelect(c.region)}>${c.region}</button></th>
        <td>${s ? s.nodes : c.active_nodes}</td>
        <td>${gb(s ? s.available_ram_gb : c.available_ram_gb)}</td>
        <td>${gb(s ? s.available_vram_gb : c.available_vram_gb)}</td>
        <td>${price(s ? s.best_ask_per_gb_sec : c.avg_price_per_gb_sec)}</td>
      </tr>`;
    })}</tbody></table>`;
}

// ------------------------------------------------------------------------------------------
// One region: book, trades, candles, 24 h volume

function Book({ book }) {
  if (!book) return html`<p>Loading the book…</p>`;
  const most = Math.max(1, ...book.ask_depth.map((l) => l.gb), ...book.bid_depth.map((l) => l.gb));
  const row = (side) => (l) => html`<tr key=${side + l.price_pusd} class=${side}>
    <td class="num">${price(l.price_per_gb_sec)}</td><td class="num">${gb(l.gb)}</td>
    <td class="depth" aria-hidden="true"><span style=${{ width: `${(100 * l.gb) / most}%` }}></span></td></tr>`;
  const asks = [...book.ask_depth].sort((a, b) => b.price_pusd - a.price_pusd);
  return html`<table class="data book" id="order-book" aria-label="Order book">
    <thead><tr><th scope="col">Price /GB·s</th><th scope="col">Size</th><th scope="col"><span class="sr">Depth</span></th></tr></thead>
    <tbody>
      ${asks.length ? asks.map(row("ask")) : html`<tr class="ask"><td colspan="3">No asks</td></tr>`}
      <tr class="spread"><td colspan="3">best ask ${price(book.best_ask_per_gb_sec)} · best bid ${price(book.best_bid_per_gb_sec)}</td></tr>
      ${book.bid_depth.length ? book.bid_depth.map(row("bid")) : html`<tr class="bid"><td colspan="3">No resting bids</td></tr>`}
    </tbody></table>`;
}

function Trades({ trades }) {
  return html`<table class="data" id="recent-trades" aria-label="Recent trades" aria-live="polite">
    <thead><tr><th scope="col">Time</th><th scope="col">Price /GB·s</th><th scope="col">Size</th>
      <th scope="col">Term</th></tr></thead>
    <tbody>${trades.length === 0 && html`<tr><td colspan="4">No trades yet</td></tr>`}
      ${trades.map((t) => html`<tr key=${t.contract_id} class=${t.fresh ? "fresh trade" : "trade"} data-contract=${t.contract_id}>
        <td>${clock(t.ts_ms)}</td><td class="num">${price(t.price_per_gb_sec)}</td>
        <td class="num">${t.ram_gb} + ${t.vram_gb} GB</td><td>${duration(t.duration_sec)}</td></tr>`)}
    </tbody></table>`;
}

function Candles({ candles, interval }) {
  const box = useRef(null);
  const chart = useRef(null);
  useEffect(() => {
    const c = createChart(box.current, {
      height: 300,
      // The library's logo injects an inline <style>, which the CSP refuses; the licence's
      // attribution and link to tradingview.com are given under the chart instead.
      layout: { attributionLogo: false, background: { color: "#ffffff" }, textColor: "#1e293b" },
      timeScale: { timeVisible: true, secondsVisible: false },
      rightPriceScale: { scaleMargins: { top: 0.1, bottom: 0.3 } },
    });
    const bars = c.addSeries(CandlestickSeries, {
      priceFormat: { type: "price", precision: 9, minMove: 1e-9 },
    });
    const volume = c.addSeries(HistogramSeries, {
      priceScaleId: "volume",
      priceFormat: { type: "volume" },
      color: "#94a3b8",
    });
    c.priceScale("volume").applyOptions({ scaleMargins: { top: 0.75, bottom: 0 } });
    chart.current = { c, bars, volume };
    return () => c.remove();
  }, []);
  const shown = useRef({ candles: [], interval: null });
  useEffect(() => {
    const { bars, volume } = chart.current;
    const bar = (k) => ({ time: k.time, open: k.open, high: k.high, low: k.low, close: k.close });
    const vol = (k) => ({ time: k.time, value: k.volume_gb_s });
    const before = shown.current;
    shown.current = { candles, interval };
    // Live trades change the last candle or add new ones: update those alone (a full setData
    // per fill is what a busy market cannot afford); anything else is a new series.
    const grown = candles.length - before.candles.length;
    if (before.interval === interval && before.candles.length && grown >= 0 && grown <= 10 &&
        candles[0].time === before.candles[0].time) {
      for (let i = before.candles.length - 1; i < candles.length; i++) {
        bars.update(bar(candles[i]));
        volume.update(vol(candles[i]));
      }
      return;
    }
    bars.setData(candles.map(bar));
    volume.setData(candles.map(vol));
  }, [candles, interval]);
  return html`<div ref=${box} class="chart" id="candles" data-candles=${candles.length}
      role="img" aria-label=${`Price candles, ${interval} buckets: ${candles.length} shown`}></div>
    <p class="attribution">Chart: TradingView Lightweight Charts™, Copyright © TradingView, Inc.,
      <a href="https://www.tradingview.com/">www.tradingview.com</a></p>`;
}

// A trade folded into the candles the way the server buckets them (open time, UTC); a trade
// older than the last candle is left to the next load (the chart cannot insert it).
function withTrade(candles, trade, bucketS) {
  const t = Math.floor(trade.ts_ms / 1000 / bucketS) * bucketS;
  const p = trade.price_per_gb_sec;
  const v = (trade.ram_gb + trade.vram_gb) * trade.duration_sec;
  const last = candles[candles.length - 1];
  if (last && t === last.time) {
    const updated = {
      ...last,
      high: Math.max(last.high, p),
      low: Math.min(last.low, p),
      close: p,
      volume_gb_s: last.volume_gb_s + v,
      fills: last.fills + 1,
    };
    return [...candles.slice(0, -1), updated];
  }
  if (!last || t > last.time) {
    return [...candles, { time: t, open: p, high: p, low: p, close: p, volume_gb_s: v, fills: 1 }];
  }
  return candles;
}

function candleOf(c) {
  return {
    time: Date.parse(c.start) / 1000,
    open: c.open,
    high: c.high,
    low: c.low,
    close: c.close,
    volume_gb_s: c.volume_gb_s,
    fills: c.fills,
  };
}

function RegionView({ region }) {
  const [book, setBook] = useState(null);
  const [trades, setTrades] = useState([]);
  const [interval, setInterval_] = useState("5m");
  const [candles, setCandles] = useState([]);
  const [day, setDay] = useState({ volume_gb_s: 0, fills: 0 });
  const [error, setError] = useState(null);
  const intervalRef = useRef(interval);
  intervalRef.current = interval;
  // Trades that arrive while the candles are being read: those in a bucket after the answer's
  // last are added to it (the answer cannot have counted them).
  const duringFetch = useRef(null);

  useEffect(() => {
    let alive = true;
    let loaded = false;
    const early = [];
    const seen = new Set();
    // Trades are applied a frame's worth at a time (see perFrame).
    const applyAll = (batch) => {
      if (!alive || !batch.length) return;
      const newest = [...batch].reverse().map((t) => ({ ...t, fresh: true }));
      setTrades((ts) => [...newest, ...ts].slice(0, TRADES_SHOWN));
      const bucketS = INTERVALS[intervalRef.current].seconds;
      setCandles((cs) => batch.reduce((c, t) => withTrade(c, t, bucketS), cs));
      if (duringFetch.current) duringFetch.current.push(...batch);
      setDay((d) => ({
        volume_gb_s: d.volume_gb_s + batch.reduce((a, t) => a + (t.ram_gb + t.vram_gb) * t.duration_sec, 0),
        fills: d.fills + batch.length,
      }));
    };
    const queued = perFrame(applyAll);
    const apply = (trade) => {
      if (seen.has(trade.contract_id)) return;
      seen.add(trade.contract_id);
      queued(trade);
    };
    const offQuotes = live.on(`quotes:${region}`, (b) => alive && setBook(b));
    const offTrades = live.on(`trades:${region}`, (t) => {
      if (!alive) return;
      if (loaded) apply(t);
      else early.push(t);
    });
    const load = async () => {
      setError(null);
      try {
        const [b, recent, day_] = await Promise.all([
          get(`/api/book/${region}`),
          get("/api/market/trades", { region, limit: TRADES_SHOWN }),
          get("/api/analytics/market/pricing", { region, bucket: "1h", start: since(86400) }),
        ]);
        if (!alive) return;
        setBook(b);
        recent.trades.forEach((t) => seen.add(t.contract_id));
        setTrades(recent.trades);
        setDay({
          volume_gb_s: day_.candles.reduce((a, c) => a + c.volume_gb_s, 0),
          fills: day_.candles.reduce((a, c) => a + c.fills, 0),
        });
        loaded = true;
        early.splice(0).forEach(apply);
      } catch (e) {
        if (alive) setError(e);
      }
    };
    load();
    const offReconnect = live.onReconnect(() => {
      seen.clear();
      loaded = false;
      load();
    });
    return () => {
      alive = false;
      offQuotes();
      offTrades();
      offReconnect();
    };
  }, [region]);

  useEffect(() => {
    let alive = true;
    const spec = INTERVALS[interval];
    duringFetch.current = [];
    get("/api/analytics/market/pricing", { region, bucket: interval, start: since(spec.range_s) }).then(
      (p) => {
        if (!alive) return;
        let cs = p.candles.map(candleOf);
        for (const t of duringFetch.current || []) {
          const last = cs[cs.length - 1];
          if (!last || Math.floor(t.ts_ms / 1000 / spec.seconds) * spec.seconds > last.time) {
            cs = withTrade(cs, t, spec.seconds);
          }
        }
        duringFetch.current = null;
        setCandles(cs);
      },
      (e) => alive && setError(e),
    );
    return () => {
      alive = false;
    };
  }, [region, interval]);

  return html`<section class="panel" aria-labelledby="region-title">
    <h2 id="region-title">${region}</h2>
    <${ErrorBox} error=${error} />
    <dl class="stats" id="region-stats">
      <div><dt>Best ask</dt><dd>${price(book && book.best_ask_per_gb_sec)}</dd></div>
      <div><dt>Best bid</dt><dd>${price(book && book.best_bid_per_gb_sec)}</dd></div>
      <div><dt>Last fill</dt><dd>${price(book && book.last_fill_per_gb_sec)}</dd></div>
      <div><dt>24 h volume</dt><dd id="volume-24h">${day.volume_gb_s.toLocaleString("en-US")} GB·s</dd></div>
      <div><dt>24 h fills</dt><dd id="fills-24h">${day.fills}</dd></div>
    </dl>
    <div class="chart-head">
      <h3>Cleared price (USD per GB·second)</h3>
      <label>Candles <select value=${interval} onChange=${(e) => setInterval_(e.target.value)}>
        ${Object.keys(INTERVALS).map((k) => html`<option value=${k}>${k}</option>`)}
      </select></label>
    </div>
    <${Candles} candles=${candles} interval=${interval} />
    <div class="two">
      <div><h3>Order book</h3><${Book} book=${book} /></div>
      <div><h3>Recent trades</h3><${Trades} trades=${trades} /></div>
    </div>
  </section>`;
}

function Market() {
  const [clusters, setClusters] = useState([]);
  const [summaries, setSummaries] = useState({});
  const [nodes, setNodes] = useState([]);
  const [region, setRegion] = useState(decodeURIComponent(location.hash.slice(1)) || null);
  const [error, setError] = useState(null);

  useEffect(() => {
    const known = new Set();
    let loading = false;
    const off = live.on(
      "market",
      perFrame((batch) => {
        setSummaries((all) => Object.assign({ ...all }, ...batch.map((s) => ({ [s.region]: s }))));
        // A region the history did not list yet (a new one, or the journal was behind): read
        // the clusters again so it gets onto the map.
        if (!loading && batch.some((s) => !known.has(s.region))) load();
      }),
    );
    const load = async () => {
      loading = true;
      try {
        const { clusters: found } = await get("/api/clusters");
        found.forEach((c) => known.add(c.region));
        setClusters(found);
        // Start on the busiest region (most active nodes) unless the address names one.
        const busiest = [...found].sort((a, b) => b.active_nodes - a.active_nodes)[0];
        setRegion((r) => r || (busiest && busiest.region) || null);
        const pages = await Promise.all(
          found.map((c) => get(`/api/clusters/${c.region}/nodes`, { status: "active", limit: 500 })),
        );
        setNodes(pages.flatMap((p) => p.nodes));
      } catch (e) {
        setError(e);
      }
      loading = false;
    };
    load();
    const timer = setInterval(load, 30000);
    const offReconnect = live.onReconnect(load);
    return () => {
      off();
      offReconnect();
      clearInterval(timer);
    };
  }, []);

  const select = (r) => {
    setRegion(r);
    history.replaceState(null, "", `#${encodeURIComponent(r)}`);
  };
  const known = useMemo(() => {
    const names = new Set(clusters.map((c) => c.region));
    Object.keys(summaries).forEach((r) => names.add(r));
    return [...names].sort();
  }, [clusters, summaries]);

  return html`<div class="page-head"><h1>Market</h1><${LiveBadge} />
      <label class="inline">Region <select id="region-select" value=${region || ""}
        onChange=${(e) => select(e.target.value)}>
        ${known.map((r) => html`<option value=${r}>${r}</option>`)}</select></label></div>
    <${ErrorBox} error=${error} />
    <div class="market">
      <section class="panel" aria-labelledby="map-title">
        <h2 id="map-title">Clusters</h2>
        <${ClusterMap} clusters=${clusters} summaries=${summaries} nodes=${nodes} region=${region} onSelect=${select} />
        <${RegionTable} clusters=${clusters} summaries=${summaries} region=${region} onSelect=${select} />
      </section>
      ${region ? html`<${RegionView} key=${region} region=${region} />` : html`<p>No regions yet.</p>`}
    </div>
    <p class="attribution">Map: Leaflet; borders from Natural Earth (world-atlas).</p>`;
}

export function mount(main) {
  render(html`<${Market} />`, main);
}
