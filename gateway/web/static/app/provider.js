// Provider pages (signed in, role provider): register a node and get the agent command that
// serves it, follow the nodes live (status, free and leased capacity, uptime, reputation),
// see earnings over time, the statement and its payouts, and each node's standing (uptime
// hour by hour, reputation, suspension) and stake.
import { html, render, useEffect, useMemo, useState } from "./ui.js";
import { currentSession, duration, formValues, gb, get, live, pct, post, price, usd, when } from "./api.js";
import { ErrorBox, Field, NeedsAccount, Notice, useLoad, useNow } from "./components.js";
import { TimePlot, align, seconds } from "./charts.js";

function shellQuote(s) {
  return /^[A-Za-z0-9_./:@-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`;
}

// The node agent's own commands (`mnemo-agent init`, then `run` with the node's id so it
// serves this registration instead of registering the machine again).
function AgentCommand({ node }) {
  const [key, setKey] = useState(null);
  const [error, setError] = useState(null);
  const makeKey = async () => {
    try {
      const created = await post("/api/auth/api-keys", { name: `agent ${node.name}`.slice(0, 100) }, { idempotent: true });
      setKey(created.key);
    } catch (e) {
      setError(e);
    }
  };
  const lines = [
    `mnemo-agent init --api-url ${location.origin} --api-key ${key || "<your provider API key>"} \\`,
    `  --name ${shellQuote(node.name)} --node-type ${node.node_type} --region ${node.region} \\`,
    `  --lat ${node.latitude} --lng ${node.longitude} --price ${node.price_per_gb_sec.toFixed(12).replace(/0+$/, "")}`,
    `MNEMO_AGENT_NODE_ID=${node.node_id} mnemo-agent run`,
  ];
  return html`<div class="agent" id="agent-command">
    <p>Run the node agent on the machine (install it from this repository: <code>pip install '.[agent]'</code>):</p>
    <pre><code>${lines.join("\n")}</code></pre>
    ${!key && html`<button type="button" class="secondary" onClick=${makeKey}>Create an API key for this agent</button>`}
    ${key && html`<p>The key is in the command above; it is shown only now.</p>`}
    <${ErrorBox} error=${error} />
  </div>`;
}

function RegisterNode({ regions, onRegistered }) {
  const [error, setError] = useState(null);
  const [node, setNode] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    const metadata = {};
    if (v.gpu_model) metadata.gpu_model = v.gpu_model;
    if (v.idle_schedule) metadata.idle_schedule = v.idle_schedule;
    delete v.gpu_model;
    delete v.idle_schedule;
    setBusy(true);
    setError(null);
    try {
      const registered = await post("/api/nodes/register", { ...v, metadata }, { idempotent: true });
      setNode(registered.node);
      onRegistered(registered.node);
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  return html`<section class="panel" id="register" aria-labelledby="register-title">
    <h2 id="register-title">Register a node</h2>
    <form class="grid" onSubmit=${submit} aria-label="Node registration">
      <${Field} label="Node type" name="node_type">
        <option value="mist_node">mist node (a consumer machine)</option>
        <option value="edge_cluster">edge cluster</option>
        <option value="datacenter">datacenter</option>
      <//>
      <${Field} label="Name" name="name" required maxlength="200" />
      <${Field} label="Region" name="region" required list="known-regions" pattern="[a-z0-9][a-z0-9\\-]*"
        hint="lowercase, e.g. us-east-2" />
      <datalist id="known-regions">${regions.map((r) => html`<option value=${r} />`)}</datalist>
      <${Field} label="Latitude" name="latitude" type="number" min="-90" max="90" step="any" required />
      <${Field} label="Longitude" name="longitude" type="number" min="-180" max="180" step="any" required />
      <${Field} label="Total RAM (GB)" name="total_ram_gb" type="number" min="0" step="1" required />
      <${Field} label="Total VRAM (GB)" name="total_vram_gb" type="number" min="0" step="1" defaultValue="0" required />
      <${Field} label="Ask price (USD/GB·s)" name="price_per_gb_sec" type="number" min="0" step="any" defaultValue="0.0000008" required />
      <${Field} label="Bandwidth (Mbit/s)" name="bandwidth_mbps" type="number" min="1" step="1" defaultValue="1000" />
      <${Field} label="Base latency (ms)" name="base_latency_ms" type="number" min="0" step="any" defaultValue="1" />
      <${Field} label="GPU model (optional)" name="gpu_model" maxlength="256" />
      <${Field} label="Idle schedule (optional)" name="idle_schedule" maxlength="256" hint="e.g. 9am-5pm, 11pm-7am" />
      <div class="field"><button type="submit" disabled=${busy}>Register</button></div>
    </form>
    <${ErrorBox} error=${error} />
    ${node && html`<${Notice}>Node ${node.name} registered (${node.node_id}).<//><${AgentCommand} node=${node} />`}
  </section>`;
}

function ago(ms, now) {
  return ms ? `${duration((now - ms) / 1000)} ago` : "never";
}

function Nodes({ nodes, error }) {
  const now = useNow(5000);
  if (error) return html`<${ErrorBox} error=${error} />`;
  if (!nodes) return html`<p class="loading">Loading…</p>`;
  return html`<section class="panel" id="nodes" aria-labelledby="nodes-title">
    <h2 id="nodes-title">Your nodes</h2>
    ${nodes.length === 0 ? html`<p>No nodes yet: register one above.</p>` : html`
    <table class="data" id="node-list" aria-label="Your nodes">
      <thead><tr><th scope="col">Node</th><th scope="col">Region</th><th scope="col">Status</th>
        <th scope="col">RAM free / leased / total</th><th scope="col">VRAM free / leased / total</th>
        <th scope="col">Price /GB·s</th><th scope="col">Uptime</th><th scope="col">Reputation</th>
        <th scope="col">Last heartbeat</th></tr></thead>
      <tbody>${nodes.map((n) => html`<tr key=${n.node_id} data-node=${n.node_id}>
        <td>${n.name} <small>(${n.node_type})</small></td><td>${n.region}</td>
        <td><span class=${"status " + n.status}>${n.status}</span></td>
        <td class="num">${n.available_ram_gb} / ${n.reserved_ram_gb} / ${gb(n.total_ram_gb)}</td>
        <td class="num">${n.available_vram_gb} / ${n.reserved_vram_gb} / ${gb(n.total_vram_gb)}</td>
        <td class="num">${price(n.price_per_gb_sec)}</td><td class="num">${pct(n.uptime_score)}</td>
        <td class="num">${n.reputation_score}</td><td>${ago(n.last_heartbeat_ms, now)}</td></tr>`)}
      </tbody></table>`}
  </section>`;
}

const EARNING_RANGES = {
  "5m": { label: "last 24 hours, 5-minute buckets", range_s: 86400 },
  "1h": { label: "last 7 days, hourly", range_s: 7 * 86400 },
  "1d": { label: "last 90 days, daily", range_s: 90 * 86400 },
};

function Earnings({ nodes }) {
  const [bucket, setBucket] = useState("5m");
  const ids = useMemo(() => (nodes || []).slice(0, 50).map((n) => n.node_id), [nodes]);
  const [data, error] = useLoad(async () => {
    const start = new Date(Date.now() - EARNING_RANGES[bucket].range_s * 1000).toISOString();
    return Promise.all(ids.map((id) => get(`/api/analytics/node/${id}/earnings`, { bucket, start })));
  }, [ids.join(","), bucket]);
  const chart = useMemo(() => {
    if (!data) return null;
    const sums = new Map();
    data.forEach((e) => e.buckets.forEach((b) => sums.set(seconds(b.start), (sums.get(seconds(b.start)) || 0) + b.amount_usd)));
    const points = [...sums.entries()].map(([t, v]) => ({ t, v }));
    const { times, values } = align([points]);
    return { times, series: [{ label: "earned (USD)", values: values[0] }], total: data.reduce((a, e) => a + e.total_usd, 0) };
  }, [data]);
  return html`<section class="panel" id="earnings" aria-labelledby="earnings-title">
    <div class="chart-head"><h2 id="earnings-title">Earnings</h2>
      <label>Period <select value=${bucket} onChange=${(e) => setBucket(e.target.value)}>
        ${Object.entries(EARNING_RANGES).map(([k, r]) => html`<option value=${k}>${r.label}</option>`)}
      </select></label></div>
    <${ErrorBox} error=${error} />
    ${chart && html`<p>Settled contracts earned <strong id="earned-total">${usd(chart.total)}</strong> over this period.</p>
      ${chart.times.length ? html`<${TimePlot} id="earnings-chart" span=${EARNING_RANGES[bucket].range_s} title="Earnings per bucket (USD)"
        times=${chart.times} series=${chart.series} bars=${true} format=${(v) => usd(v)} />`
        : html`<p>Nothing settled in this period yet.</p>`}`}
  </section>`;
}

// ------------------------------------------------------------------------------------------
// Payouts: the statement of the last 30 days (earnings net of the fee, payouts, what is owed)

function PayoutAccount({ statement }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const onboard = async () => {
    setBusy(true);
    setError(null);
    try {
      const here = location.origin + location.pathname + "#payouts";
      const account = await post("/api/payments/connect/onboard", { return_url: here, refresh_url: here });
      location.assign(account.onboarding_url);
    } catch (e) {
      setError(e);
      setBusy(false);
    }
  };
  if (!currentSession().payments?.cards) {
    return html`<p id="payout-account">Stripe is not configured on this exchange, so nothing is paid
      out yet: your earnings wait in your account here until it is.</p>`;
  }
  return html`<div id="payout-account">
    ${statement.stripe_account_id
      ? html`<p>Payouts go to Stripe account <code>${statement.stripe_account_id}</code>${": "}${statement.transfers_active ? "it receives transfers." : "Stripe does not accept transfers to it yet (onboarding unfinished)."}</p>`
      : html`<p>Set up a Stripe account to be paid: each day's earnings are transferred to it after 00:00 UTC.</p>`}
    ${!statement.transfers_active && html`<button type="button" onClick=${onboard} disabled=${busy}>
      ${statement.stripe_account_id ? "Finish onboarding with Stripe" : "Set up payouts with Stripe"}</button>`}
    <${ErrorBox} error=${error} />
  </div>`;
}

function Payouts({ nodes }) {
  // Read again when the node list changes (a node registered, a contract started or ended).
  const [statement, error, reload] = useLoad(() => get("/api/payments/statement"), [nodes]);
  return html`<section class="panel" id="payouts" aria-labelledby="payouts-title">
    <div class="chart-head"><h2 id="payouts-title">Statement and payouts</h2>
      <button type="button" class="secondary" onClick=${reload}>Refresh</button></div>
    <${ErrorBox} error=${error} />
    ${statement && html`<p>${`The UTC days from ${statement.start.slice(0, 10)} up to ${statement.end.slice(0, 10)} (not included).`}</p>
    <dl class="stats">
      <div><dt>Owed to you now</dt><dd id="owed">${usd(statement.balance_usd)}</dd></div>
      <div><dt>Earned (net of fees)</dt><dd id="statement-earned">${usd(statement.earnings_usd)}</dd></div>
      <div><dt>Platform fees</dt><dd>${usd(statement.fees_usd)}</dd></div>
      <div><dt>Paid out</dt><dd>${usd(statement.payouts_usd)}</dd></div>
      <div><dt>Locked as stake</dt><dd>${usd(statement.stake_usd)}</dd></div>
    </dl>
    <${PayoutAccount} statement=${statement} />
    <h3>Payouts</h3>
    ${statement.payouts.length === 0 ? html`<p id="payout-list">No payout in this period.</p>` : html`
    <table class="data" id="payout-list" aria-label="Payouts">
      <thead><tr><th scope="col">Day</th><th scope="col">Status</th><th scope="col">Amount</th>
        <th scope="col">Transfer</th><th scope="col">Paid</th></tr></thead>
      <tbody>${statement.payouts.map((p) => html`<tr key=${p.period + p.status}>
        <td>${p.period}</td><td><span class=${"status " + p.status}>${p.status}</span>
          ${p.error_message && html` <small>${p.error_message}</small>`}</td>
        <td class="num">${usd(p.amount_usd)}</td><td><code>${p.stripe_transfer_id || "–"}</code></td>
        <td>${p.paid_at ? when(Date.parse(p.paid_at)) : "–"}</td></tr>`)}</tbody></table>`}
    ${statement.nodes.length > 0 && html`<h3>Per node</h3>
    <table class="data" id="statement-nodes" aria-label="Earnings per node">
      <thead><tr><th scope="col">Node</th><th scope="col">Region</th><th scope="col">Contracts closed</th>
        <th scope="col">GB·s sold</th><th scope="col">Renters paid</th><th scope="col">Stake</th></tr></thead>
      <tbody>${statement.nodes.map((n) => html`<tr key=${n.node_id} data-node=${n.node_id}>
        <td>${n.name}</td><td>${n.region}</td><td class="num">${n.contracts}</td>
        <td class="num">${n.gb_sec.toLocaleString("en-US")}</td><td class="num">${usd(n.gross_usd)}</td>
        <td class="num">${usd(n.stake_usd)}</td></tr>`)}</tbody></table>`}`}
  </section>`;
}

// ------------------------------------------------------------------------------------------
// Trust: a node's measured uptime hour by hour, its reputation and standing, and its stake

function Stake({ node, onChanged }) {
  const [error, setError] = useState(null);
  const [done, setDone] = useState(null);
  const [busy, setBusy] = useState(false);
  const act = async (event, path, verb) => {
    event.preventDefault();
    const amount = Number(event.target.elements.amount_usd.value);
    setBusy(true);
    setError(null);
    setDone(null);
    try {
      const lock_id = crypto.randomUUID().replaceAll("-", "");
      onChanged(await post(`/api/nodes/${node.node_id}/${path}`, { amount_usd: amount, lock_id }));
      setDone(`${usd(amount)} ${verb}.`);
      event.target.reset();
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  return html`<div id="stake"><h3>Stake</h3>
    <p>The stake covers the leases the node may take (10 % of their value beyond 10 USD) and pays
      renters' credits when the node cuts a lease short. It is locked out of your earnings not yet
      paid out.</p>
    <dl class="stats">
      <div><dt>Locked</dt><dd id="stake-locked">${usd(node.stake_usd)}</dd></div>
      <div><dt>Of which held back from earnings</dt><dd>${usd(node.stake_held_usd)}</dd></div>
      <div><dt>Required by its leases now</dt><dd id="stake-required">${usd(node.stake_required_usd)}</dd></div>
    </dl>
    <div class="two">
      <form class="actions" onSubmit=${(e) => act(e, "stake", "locked")} aria-label="Lock stake">
        <${Field} label="Lock (USD)" name="amount_usd" type="number" min="0.000001" step="any" required />
        <button type="submit" disabled=${busy}>Lock stake</button>
      </form>
      <form class="actions" onSubmit=${(e) => act(e, "stake/release", "released")} aria-label="Release stake">
        <${Field} label="Release (USD)" name="amount_usd" type="number" min="0.000001" step="any" required />
        <button type="submit" class="secondary" disabled=${busy || node.stake_usd <= node.stake_required_usd}>Release stake</button>
      </form>
    </div>
    <${Notice}>${done}<//>
    <${ErrorBox} error=${error} />
  </div>`;
}

const NOTICE_TEXT = {
  warned: "warned: uptime below 60",
  cleared: "warning cleared",
  suspended: "suspended from new leases",
  reinstated: "reinstated",
};

function Trust({ nodes }) {
  const [chosen, setChosen] = useState(null);
  const nodeId = chosen || (nodes && nodes.length ? nodes[0].node_id : null);
  const [detail, setDetail] = useState(null);
  const [scores, setScores] = useState(null);
  const [error, setError] = useState(null);
  const load = () => {
    if (!nodeId) return;
    Promise.all([get(`/api/nodes/${nodeId}`), get(`/api/nodes/${nodeId}/scores`)]).then(
      ([d, s]) => (setDetail(d), setScores(s), setError(null)),
      setError,
    );
  };
  useEffect(() => {
    if (!nodeId) return undefined;
    setDetail(null);
    setScores(null);
    load();
    const offs = [live.on(`node:${nodeId}`, load)];
    return () => offs.forEach((off) => off());
  }, [nodeId]);
  const chart = useMemo(() => {
    if (!scores) return null;
    const windows = scores.windows;
    return {
      times: windows.map((w) => w.window_start_ms / 1000),
      series: [
        { label: "up that hour (%)", values: windows.map((w) => w.up_pct) },
        { label: "30-day score", values: windows.map((w) => w.uptime_score) },
      ],
      notices: windows.filter((w) => w.notice),
    };
  }, [scores]);
  if (!nodes || nodes.length === 0) return null;
  const node = detail && detail.node_id === nodeId ? detail : null;
  return html`<section class="panel" id="trust" aria-labelledby="trust-title">
    <div class="chart-head"><h2 id="trust-title">Uptime, reputation and stake</h2>
      <label class="inline">Node <select value=${nodeId} onChange=${(e) => setChosen(e.target.value)}>
        ${nodes.map((n) => html`<option value=${n.node_id}>${n.name} (${n.region})</option>`)}</select></label></div>
    <${ErrorBox} error=${error} />
    ${node && html`<dl class="stats" id="standing">
      <div><dt>Uptime score (30 days)</dt><dd id="uptime-score">${pct(node.uptime_score)}</dd></div>
      <div><dt>Hours measured</dt><dd>${node.uptime_history_windows}${node.uptime_new ? " (new: blended with 90)" : ""}</dd></div>
      <div><dt>Reputation</dt><dd id="reputation">${node.reputation_score}</dd></div>
      <div><dt>Leases delivered / cut short</dt><dd>${node.delivered_contracts} / ${node.cut_contracts}</dd></div>
      <div><dt>Standing</dt><dd id="node-standing">${node.suspended
        ? `suspended since ${when(node.suspended_since_ms)}`
        : node.suspension_due_ms ? `warned: suspended at ${when(node.suspension_due_ms)} unless back at 60` : "good"}</dd></div>
      <div><dt>Maintenance</dt><dd>${node.maintenance_start_ms
        ? `${when(node.maintenance_start_ms)} to ${when(node.maintenance_end_ms)}` : "none announced"}</dd></div>
    </dl>
    ${chart && (chart.times.length
      ? html`<${TimePlot} id="score-chart" span=${30 * 86400} title="Uptime hour by hour (%)"
          times=${chart.times} series=${chart.series} format=${(v) => `${v}%`} />`
      : html`<p id="score-chart-empty">No hour measured yet: the first is scored when it closes.</p>`)}
    ${chart && chart.notices.length > 0 && html`<ul id="standing-changes">${chart.notices.map((w) =>
      html`<li key=${w.window_start_ms}>${when(w.window_start_ms)}: ${NOTICE_TEXT[w.notice]}</li>`)}</ul>`}
    <${Stake} node=${node} onChanged=${setDetail} />`}
  </section>`;
}

// The page's sections after the registration form and the node list, in order: each is a
// component given ({ nodes, regions }).
const SECTIONS = [Earnings, Payouts, Trust];

function Provider({ session }) {
  const [clusters] = useLoad(() => get("/api/clusters"));
  const [nodes, setNodes] = useState(null);
  const [error, setError] = useState(null);
  const load = () => get("/api/nodes", { mine: true, limit: 100 }).then((r) => setNodes(r.nodes), setError);
  const signedIn = session.signed_in;
  useEffect(() => {
    if (!signedIn) return undefined;
    load();
    const timer = setInterval(load, 15000);
    const off = live.onReconnect(load);
    return () => {
      clearInterval(timer);
      off();
    };
  }, [signedIn]);
  // A contract starting, ending or moving on a node changes its capacity: read it again.
  const ids = (nodes || []).map((n) => n.node_id).slice(0, 100).join(",");
  useEffect(() => {
    if (!ids) return undefined;
    const offs = ids.split(",").map((id) => live.on(`node:${id}`, load));
    return () => offs.forEach((off) => off());
  }, [ids]);
  const blocked = NeedsAccount({ session, roles: ["provider", "admin"], what: "Provider" });
  if (blocked) return blocked;
  const regions = clusters ? clusters.clusters.map((c) => c.region) : [];
  return html`<h1>Provider</h1>
    <${RegisterNode} regions=${regions} onRegistered=${(n) => setNodes((ns) => [n, ...(ns || [])])} />
    <${Nodes} nodes=${nodes} error=${error} />
    ${SECTIONS.map((Section) => html`<${Section} nodes=${nodes} regions=${regions} />`)}`;
}

export function mount(main, session) {
  render(html`<${Provider} session=${session} />`, main);
}
