// Renter pages (signed in, role user): the balance and its top-ups, browse the market with
// the spec's filters, ask for ranked matches and take one, follow contracts live (remaining
// time, accrued cost) with their lease's access details, extend and settle them, place, follow
// and cancel limit bids, and read the monthly invoices.
import { html, render, useEffect, useMemo, useState } from "./ui.js";
import {
  clock,
  currentSession,
  del,
  duration,
  formValues,
  gb,
  get,
  live,
  pct,
  post,
  price,
  usd,
  when,
} from "./api.js";
import { ErrorBox, Field, LiveBadge, NeedsAccount, Notice, useLoad, useNow } from "./components.js";

const NODE_TYPES = ["datacenter", "edge_cluster", "mist_node"];

function TypeSelect({ label = "Node type", name = "node_type" }) {
  return html`<${Field} label=${label} name=${name}>
    <option value="">any</option>${NODE_TYPES.map((t) => html`<option value=${t}>${t}</option>`)}
  <//>`;
}

function RegionSelect({ regions, required = false, label = "Region" }) {
  return html`<${Field} label=${label} name="region" required=${required}>
    ${!required && html`<option value="">any</option>`}
    ${regions.map((r) => html`<option value=${r}>${r}</option>`)}
  <//>`;
}

function short(id) {
  return id.slice(0, 8);
}

// ------------------------------------------------------------------------------------------
// Browse

function Browse({ client, regions }) {
  const [query, setQuery] = useState({});
  const [offers, error] = useLoad(() => get("/api/marketplace", { limit: 20, ...query }), [query]);
  const submit = (event) => {
    event.preventDefault();
    const values = formValues(event.target);
    if (values.max_distance_km !== undefined && client.latitude !== null) {
      values.client_lat = client.latitude;
      values.client_lng = client.longitude;
    }
    setQuery(values);
  };
  return html`<section class="panel" id="browse" aria-labelledby="browse-title">
    <h2 id="browse-title">Browse the market</h2>
    <form class="grid" onSubmit=${submit} aria-label="Market filters">
      <${TypeSelect} />
      <${RegionSelect} regions=${regions} />
      <${Field} label="Min RAM (GB)" name="min_ram_gb" type="number" min="0" step="1" />
      <${Field} label="Min VRAM (GB)" name="min_vram_gb" type="number" min="0" step="1" />
      <${Field} label="Max price (USD/GB·s)" name="max_price_per_gb_sec" type="number" min="0" step="any" />
      <${Field} label="Min uptime (%)" name="min_uptime_score" type="number" min="0" max="100" step="any" />
      <${Field} label="Max distance (km)" name="max_distance_km" type="number" min="0" step="any"
        disabled=${client.latitude === null}
        hint=${client.latitude === null ? "your profile has no location" : "from your profile's location"} />
      <div class="field"><button type="submit">Search</button></div>
    </form>
    <${ErrorBox} error=${error} />
    ${offers && html`<p>${offers.total_count} offers${offers.total_count > offers.offers.length ? `, the first ${offers.offers.length} shown` : ""}.</p>
    <table class="data" id="offers" aria-label="Offers">
      <thead><tr><th scope="col">Node</th><th scope="col">Type</th><th scope="col">Region</th>
        <th scope="col">Free RAM</th><th scope="col">Free VRAM</th><th scope="col">Price /GB·s</th>
        <th scope="col">Uptime</th><th scope="col">Distance</th></tr></thead>
      <tbody>${offers.offers.map((o) => html`<tr key=${o.node_id}>
        <td>${o.node_name}</td><td>${o.node_type}</td><td>${o.region}</td>
        <td class="num">${gb(o.available_ram_gb)}</td><td class="num">${gb(o.available_vram_gb)}</td>
        <td class="num">${price(o.price_per_gb_sec)}</td><td class="num">${pct(o.uptime_score)}</td>
        <td class="num">${o.distance_km === null ? "–" : `${o.distance_km.toFixed(0)} km`}</td></tr>`)}
      </tbody></table>`}
  </section>`;
}

// ------------------------------------------------------------------------------------------
// Request matches and take one

function RequestMatches({ client, regions, onTaken }) {
  const [request, setRequest] = useState(null);
  const [result, setResult] = useState(null);
  const [error, setError] = useState(null);
  const [taken, setTaken] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    const body = {
      client_id: client.id,
      ram_gb: v.ram_gb,
      vram_gb: v.vram_gb,
      duration_sec: Math.round(v.duration_min * 60),
      max_price_per_gb_sec: v.max_price_per_gb_sec,
      prefer_local: v.prefer_local,
      min_uptime_score: v.min_uptime_score,
      node_type: v.node_type,
      region: v.region,
    };
    setBusy(true);
    setError(null);
    setTaken(null);
    try {
      setResult(await post("/api/marketplace/request", body));
      setRequest(body);
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  const take = async (match) => {
    setError(null);
    try {
      const contract = await post(
        "/api/contracts/create",
        {
          client_id: client.id,
          node_id: match.node_id,
          ram_gb: request.ram_gb,
          vram_gb: request.vram_gb,
          duration_sec: request.duration_sec,
          max_price_per_gb_sec: request.max_price_per_gb_sec,
        },
        { idempotent: true },
      );
      setTaken(contract);
      setResult(null);
      onTaken(contract);
    } catch (e) {
      setError(e);
    }
  };
  return html`<section class="panel" id="request" aria-labelledby="request-title">
    <h2 id="request-title">Request memory</h2>
    <form class="grid" onSubmit=${submit} aria-label="Request">
      <${Field} label="RAM (GB)" name="ram_gb" type="number" min="0" step="1" defaultValue="8" required />
      <${Field} label="VRAM (GB)" name="vram_gb" type="number" min="0" step="1" defaultValue="0" required />
      <${Field} label="Duration (minutes)" name="duration_min" type="number" min="1" step="any" defaultValue="60" required />
      <${Field} label="Max price (USD/GB·s)" name="max_price_per_gb_sec" type="number" min="0" step="any" defaultValue="0.000001" required />
      <${Field} label="Min uptime (%)" name="min_uptime_score" type="number" min="0" max="100" step="any" defaultValue="0" />
      <${TypeSelect} />
      <${RegionSelect} regions=${regions} />
      <${Field} label="Prefer nearby nodes" name="prefer_local" type="checkbox" defaultChecked=${client.prefer_local} />
      <div class="field"><button type="submit" disabled=${busy}>Find matches</button></div>
    </form>
    <${ErrorBox} error=${error} />
    <${Notice}>${taken && `Contract ${short(taken.contract_id)} started on ${taken.region} at ${price(taken.price_per_gb_sec)}/GB·s.`}<//>
    ${result && (result.matches.length === 0
      ? html`<p id="matches">No node matches; raise the price cap or ask for less.</p>`
      : html`<table class="data" id="matches" aria-label="Ranked matches">
      <thead><tr><th scope="col">#</th><th scope="col">Node</th><th scope="col">Region</th>
        <th scope="col">Score</th><th scope="col">Proximity · price · reliability · capacity · type</th>
        <th scope="col">Distance</th><th scope="col">Price /GB·s</th><th scope="col">Estimated cost</th>
        <th scope="col"><span class="sr">Action</span></th></tr></thead>
      <tbody>${result.matches.map((m, i) => html`<tr key=${m.node_id}>
        <td>${i + 1}</td><td>${m.node_name} <small>(${m.node_type})</small></td><td>${m.region}</td>
        <td class="num">${m.match_score.toFixed(1)}</td>
        <td>${[m.score_breakdown.proximity, m.score_breakdown.price, m.score_breakdown.reliability,
          m.score_breakdown.capacity, m.score_breakdown.type_bonus].map((x) => x.toFixed(1)).join(" · ")}</td>
        <td class="num">${m.distance_km === null ? "–" : `${m.distance_km.toFixed(0)} km`}</td>
        <td class="num">${price(m.price_per_gb_sec)}</td><td class="num">${usd(m.estimated_cost)}</td>
        <td><button type="button" onClick=${() => take(m)} aria-label=${`Take ${m.node_name}`}>Take</button></td>
      </tr>`)}</tbody></table>`)}
  </section>`;
}

// ------------------------------------------------------------------------------------------
// Contracts

// The lease's access details (GET /api/contracts/{id}/access): its state, endpoint and the
// redis:// URL with its credentials once the node's agent reports it ready; read again when
// the `leases` channel announces a change (ready, moved to a failover's node, failed, closed).
function LeaseAccess({ contract }) {
  const [access, setAccess] = useState(null);
  const [error, setError] = useState(null);
  const [shown, setShown] = useState(false);
  const id = contract.contract_id;
  const open = contract.status === "active";
  useEffect(() => {
    if (!open) return undefined;
    let alive = true;
    const load = () =>
      get(`/api/contracts/${id}/access`).then(
        (a) => alive && (setAccess(a), setError(null)),
        (e) => alive && setError(e),
      );
    load();
    const offs = [live.on("leases", (n) => n.lease.contract_id === id && load()), live.onReconnect(load)];
    return () => {
      alive = false;
      offs.forEach((off) => off());
    };
  }, [id, open]);
  if (!open) return null;
  if (error) return html`<${ErrorBox} error=${error} />`;
  if (!access) return null;
  if (!access.delivered) {
    return html`<p class="lease" data-lease-state="none">${access.kind === "vram"
      ? "VRAM is reserved on the node, not delivered over the network."
      : "Reserved capacity: this node does not deliver leases itself; reach it as agreed with its provider."}</p>`;
  }
  const where = access.host ? `${access.host}:${access.port}${access.tls ? " (TLS)" : ""}` : "";
  return html`<div class="lease" data-lease-state=${access.state}>
    <span class=${"status " + access.state}>lease ${access.state}</span>
    ${access.state === "pending" && html` <span>waiting for the node to open it…</span>`}
    ${where && html` <code class="endpoint">${where}</code>`}
    ${access.url && html` <button type="button" class="link" aria-expanded=${shown}
      onClick=${() => setShown(!shown)}>${shown ? "Hide" : "Show"} connection URL</button>
      ${shown && html`<div><label class="inline">URL (holds the password)
        <input class="lease-url" readonly value=${access.url} size="60" /></label></div>`}`}
  </div>`;
}

// Extra details under a contract row, one component each, given ({ contract }).
const CONTRACT_DETAILS = [LeaseAccess];

function ContractRow({ contract, now, onChanged }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const activeNow = contract.status === "active";
  const gbTotal = contract.ram_gb + contract.vram_gb;
  const elapsed = Math.max(0, Math.min(now, contract.end_ms) - contract.start_ms) / 1000;
  const accrued = activeNow ? gbTotal * elapsed * contract.price_per_gb_sec : contract.total_cost_usd;
  const act = async (fn) => {
    setBusy(true);
    setError(null);
    try {
      onChanged(await fn());
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  const extend = (event) => {
    event.preventDefault();
    const minutes = Number(event.target.elements.minutes.value);
    act(() =>
      post(`/api/contracts/${contract.contract_id}/extend`, {
        additional_duration_sec: Math.round(minutes * 60),
      }),
    );
  };
  const settle = () => act(() => post(`/api/contracts/${contract.contract_id}/settle`, { actual_egress_gb: 0 }));
  const label = `contract ${short(contract.contract_id)}`;
  return html`<tr data-contract=${contract.contract_id} class="contract">
      <td><code>${short(contract.contract_id)}</code></td><td>${contract.region}</td>
      <td class="num">${contract.ram_gb} + ${contract.vram_gb} GB</td>
      <td class="num">${price(contract.price_per_gb_sec)}</td><td>${when(contract.start_ms)}</td>
      <td class="remaining">${activeNow ? duration((contract.end_ms - now) / 1000) : "–"}</td>
      <td class="num accrued">${usd(accrued)}</td>
      <td><span class=${"status " + contract.status}>${contract.status}</span></td>
      <td>${activeNow && html`<div class="actions">
        <form class="actions" onSubmit=${extend} aria-label=${`Extend ${label}`}>
          <label for=${"ext-" + contract.contract_id} class="sr">Minutes to add to ${label}</label>
          <input id=${"ext-" + contract.contract_id} name="minutes" type="number" min="1" step="any" defaultValue="30" />
          <button type="submit" class="secondary" disabled=${busy}>Extend</button>
        </form>
        <button type="button" class="danger" onClick=${settle} disabled=${busy} aria-label=${`Settle ${label}`}>Settle</button>
      </div>`}
      ${error && html`<${ErrorBox} error=${error} />`}
      ${CONTRACT_DETAILS.map((Detail) => html`<${Detail} contract=${contract} />`)}</td>
    </tr>`;
}

function Contracts({ client, refresh }) {
  const [contracts, setContracts] = useState(null);
  const [error, setError] = useState(null);
  const now = useNow(1000);
  const load = () =>
    get("/api/contracts", { client_id: client.id, limit: 50 }).then(
      (r) => setContracts(r.contracts),
      (e) => setError(e),
    );
  const upsert = (c) =>
    setContracts((cs) => {
      const rest = (cs || []).filter((x) => x.contract_id !== c.contract_id);
      return [c, ...rest].sort((a, b) => (a.status === "active") === (b.status === "active")
        ? b.start_ms - a.start_ms : a.status === "active" ? -1 : 1);
    });
  useEffect(() => {
    load();
    const offs = [
      live.on("fills", (c) => c.client_id === client.id && upsert(c)),
      live.on("contracts", (n) => n.contract.client_id === client.id && upsert(n.contract)),
      live.onReconnect(load),
    ];
    return () => offs.forEach((off) => off());
  }, [client.id, refresh]);
  return html`<section class="panel" id="contracts" aria-labelledby="contracts-title">
    <h2 id="contracts-title">Contracts</h2>
    <${ErrorBox} error=${error} />
    ${contracts && (contracts.length === 0 ? html`<p>No contracts yet.</p>` : html`
    <table class="data" aria-label="Your contracts">
      <thead><tr><th scope="col">Contract</th><th scope="col">Region</th><th scope="col">Size</th>
        <th scope="col">Price /GB·s</th><th scope="col">Started</th><th scope="col">Remaining</th>
        <th scope="col">Cost so far</th><th scope="col">Status</th><th scope="col">Actions</th></tr></thead>
      <tbody>${contracts.map((c) => html`<${ContractRow} key=${c.contract_id} contract=${c} now=${now} onChanged=${upsert} />`)}</tbody>
    </table>`)}
  </section>`;
}

// ------------------------------------------------------------------------------------------
// Limit bids

function Bids({ client, regions }) {
  const [bids, setBids] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const upsert = (b) =>
    setBids((bs) => [b, ...(bs || []).filter((x) => x.bid_id !== b.bid_id)].sort((x, y) => y.created_ms - x.created_ms));
  const load = () =>
    get("/api/bids", { client_id: client.id, limit: 50 }).then((r) => setBids(r.bids), (e) => setError(e));
  useEffect(() => {
    load();
    const offs = [live.on("bids", (n) => n.bid.client_id === client.id && upsert(n.bid)), live.onReconnect(load)];
    return () => offs.forEach((off) => off());
  }, [client.id]);
  const place = async (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    setBusy(true);
    setError(null);
    try {
      const bid = await post(
        "/api/bids",
        {
          client_id: client.id,
          region: v.region,
          ram_gb: v.ram_gb,
          vram_gb: v.vram_gb,
          duration_sec: Math.round(v.duration_min * 60),
          max_price_per_gb_sec: v.max_price_per_gb_sec,
          allow_split: v.allow_split,
          min_fill_gb: v.min_fill_gb,
          expires_in_sec: v.expires_min === undefined ? 0 : Math.round(v.expires_min * 60),
        },
        { idempotent: true },
      );
      upsert(bid);
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  const cancel = async (bid) => {
    setError(null);
    try {
      upsert(await del(`/api/bids/${bid.bid_id}`));
    } catch (e) {
      setError(e);
    }
  };
  return html`<section class="panel" id="bids" aria-labelledby="bids-title">
    <h2 id="bids-title">Limit bids</h2>
    <p>A bid rests in its region's book and fills as soon as an ask at or under its price cap
      appears; you pay the ask's price.</p>
    <form class="grid" onSubmit=${place} aria-label="Place a bid">
      <${RegionSelect} regions=${regions} required=${true} />
      <${Field} label="RAM (GB)" name="ram_gb" type="number" min="0" step="1" defaultValue="4" required />
      <${Field} label="VRAM (GB)" name="vram_gb" type="number" min="0" step="1" defaultValue="0" required />
      <${Field} label="Duration (minutes)" name="duration_min" type="number" min="1" step="any" defaultValue="60" required />
      <${Field} label="Price cap (USD/GB·s)" name="max_price_per_gb_sec" type="number" min="0" step="any" defaultValue="0.0000002" required />
      <${Field} label="Expires after (minutes)" name="expires_min" type="number" min="0" step="any" hint="empty: good till cancelled" />
      <${Field} label="Min fill (GB)" name="min_fill_gb" type="number" min="0" step="1" />
      <${Field} label="May fill across nodes" name="allow_split" type="checkbox" />
      <div class="field"><button type="submit" disabled=${busy}>Place bid</button></div>
    </form>
    <${ErrorBox} error=${error} />
    ${bids && (bids.length === 0 ? html`<p>No bids yet.</p>` : html`
    <table class="data" id="bid-list" aria-label="Your bids">
      <thead><tr><th scope="col">Bid</th><th scope="col">Region</th><th scope="col">Size</th>
        <th scope="col">Filled</th><th scope="col">Cap /GB·s</th><th scope="col">Placed</th>
        <th scope="col">Status</th><th scope="col"><span class="sr">Action</span></th></tr></thead>
      <tbody>${bids.map((b) => html`<tr key=${b.bid_id} data-bid=${b.bid_id} class="bid-row">
        <td><code>${short(b.bid_id)}</code></td><td>${b.region}</td>
        <td class="num">${b.ram_gb} + ${b.vram_gb} GB</td>
        <td class="num">${b.filled_ram_gb} + ${b.filled_vram_gb} GB</td>
        <td class="num">${price(b.max_price_per_gb_sec)}</td><td>${clock(b.created_ms)}</td>
        <td><span class=${"status " + b.status}>${b.status}</span></td>
        <td>${b.status === "open" && html`<button type="button" class="danger" onClick=${() => cancel(b)}
          aria-label=${`Cancel bid ${short(b.bid_id)}`}>Cancel</button>`}</td></tr>`)}
      </tbody></table>`)}
  </section>`;
}

// ------------------------------------------------------------------------------------------
// Balance and top-up

function TopUp({ client, onCredited }) {
  const assets = currentSession().payments?.crypto || [];
  const [request, setRequest] = useState(null);
  const [payment, setPayment] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  // A submitted transaction waits for its chain's finality: ask again until it is credited.
  useEffect(() => {
    if (!request || !payment || payment.status === "credited" || payment.status === "failed") return undefined;
    const timer = setInterval(async () => {
      try {
        const r = await get(`/api/payments/crypto/requests/${request.id}`);
        if (r.payment) setPayment(r.payment);
        if (r.payment && r.payment.status === "credited") onCredited();
      } catch (e) {
        setError(e);
      }
    }, 3000);
    return () => clearInterval(timer);
  }, [request, payment]);
  if (!assets.length) {
    return currentSession().payments?.cards
      ? null
      : html`<p id="topup">No payment rail is configured on this exchange: an operator credits your balance.</p>`;
  }
  const ask = async (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    const [blockchain, asset] = v.asset.split(":");
    setBusy(true);
    setError(null);
    setPayment(null);
    try {
      setRequest(await post(
        "/api/payments/crypto/requests",
        { client_id: client.id, blockchain, asset, amount_usd: v.amount_usd },
        { idempotent: true },
      ));
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  const submit = async (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    setBusy(true);
    setError(null);
    try {
      const p = await post("/api/payments/crypto", {
        request_id: request.id,
        blockchain: request.blockchain,
        tx_hash: v.tx_hash,
      });
      setPayment(p);
      if (p.status === "credited") onCredited();
    } catch (e) {
      setError(e);
    }
    setBusy(false);
  };
  return html`<div id="topup"><h3>Top up</h3>
    <form class="grid" onSubmit=${ask} aria-label="Top up">
      <${Field} label="Pay with" name="asset">
        ${assets.map((a) => html`<option value=${`${a.blockchain}:${a.asset}`}>${a.asset} (${a.blockchain})</option>`)}
      <//>
      <${Field} label="Amount (USD)" name="amount_usd" type="number" min="0.01" step="0.01" defaultValue="10" required />
      <div class="field"><button type="submit" disabled=${busy}>Get payment details</button></div>
    </form>
    ${request && html`<div class="pay-request" id="pay-request">
      <p>${"Send exactly "}<strong>${request.amount} ${request.asset}</strong>${` (${usd(request.amount_usd)} at ${request.usd_per_unit} USD per ${request.asset}) on ${request.blockchain} to`}</p>
      <p><code class="pay-to">${request.pay_to}</code></p>
      ${request.reference && html`<p>${"with the reference "}<code class="reference">${request.reference}</code>${" among the transfer's keys,"}</p>`}
      <p>${`before ${when(Date.parse(request.expires_at))}, or open it in a wallet: `}<a href=${request.payment_uri}>${request.asset} payment link</a>.</p>
      <form class="grid" onSubmit=${submit} aria-label="Report the payment">
        <${Field} label="Transaction hash (or signature)" name="tx_hash" required />
        <div class="field"><button type="submit" disabled=${busy}>I have paid</button></div>
      </form>
      ${payment && html`<${Notice}>Payment ${payment.status}${payment.status === "credited"
        ? `: ${usd(payment.credited_usd)} added to your balance.`
        : payment.status === "failed" ? `: ${payment.error_message || payment.error_code}` : ": waiting for the chain's finality…"}<//>`}
    </div>`}
    <${ErrorBox} error=${error} />
  </div>`;
}

// A card top-up is paid on Stripe Checkout, Stripe's own page: this page loads no script of
// Stripe's (the CSP allows none) and never sees the card. Stripe sends the payer back here with
// `?checkout=<payment id>` (and `checkout_canceled=1` if they gave up); the page then asks
// about that payment until Stripe's answer is final.
function checkoutOutcome(p) {
  if (p.credited) return `Card payment succeeded: ${usd(p.amount_usd)} added to your balance.`;
  if (p.left) return "No card payment was made: you left Stripe's page.";
  if (p.status === "canceled" || p.status === "failed") return `Card payment ${p.status}${p.error_message ? `: ${p.error_message}` : "."}`;
  return `Card payment of ${usd(p.amount_usd)} ${p.status.replaceAll("_", " ")}: waiting for Stripe…`;
}

function CardTopUp({ client, onCredited }) {
  const [payment, setPayment] = useState(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    const query = new URLSearchParams(location.search);
    const id = query.get("checkout");
    if (!id) return undefined;
    const left = query.get("checkout_canceled") === "1";
    history.replaceState(null, "", location.pathname + location.hash);
    let timer = null;
    const look = async () => {
      try {
        const p = { ...(await get(`/api/payments/cards/${id}`)), left };
        setPayment(p);
        if (p.credited) onCredited();
        else if (!left && !["canceled", "failed"].includes(p.status)) timer = setTimeout(look, 2000);
      } catch (e) {
        setError(e);
      }
    };
    look();
    return () => clearTimeout(timer);
  }, []);
  const pay = async (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    setBusy(true);
    setError(null);
    try {
      const p = await post(
        "/api/payments/checkout",
        { client_id: client.id, amount_usd: v.amount_usd, return_url: `${location.origin}/renter#balance` },
        { idempotent: true },
      );
      location.assign(p.checkout_url);
    } catch (e) {
      setError(e);
      setBusy(false);
    }
  };
  return html`<div id="card-topup"><h3>Top up by card</h3>
    <form class="grid" onSubmit=${pay} aria-label="Top up by card">
      <${Field} label="Card amount (USD)" name="amount_usd" type="number" min="0.50" step="0.01" defaultValue="10" required />
      <div class="field"><button type="submit" disabled=${busy}>Pay by card</button></div>
    </form>
    <p>You pay on Stripe's page; the card number never reaches Mnemo.</p>
    ${payment && html`<${Notice}>${checkoutOutcome(payment)}<//>`}
    <${ErrorBox} error=${error} />
  </div>`;
}

function Balance({ client }) {
  const [balance, error, reload] = useLoad(() => get(`/api/clients/${client.id}/balance`), [client.id]);
  // Holds move with every contract, bid and settlement: read the balance again after each.
  useEffect(() => {
    const offs = [
      live.on("fills", reload),
      live.on("contracts", reload),
      live.on("bids", reload),
      live.onReconnect(reload),
    ];
    return () => offs.forEach((off) => off());
  }, [client.id]);
  return html`<section class="panel" id="balance" aria-labelledby="balance-title">
    <h2 id="balance-title">Balance</h2>
    <${ErrorBox} error=${error} />
    ${balance && html`<dl class="stats" aria-live="polite">
      <div><dt>Available</dt><dd id="balance-available">${usd(balance.available_usd)}</dd></div>
      <div><dt>Held for contracts and bids</dt><dd id="balance-held">${usd(balance.held_usd)}</dd></div>
      <div><dt>Credit line</dt><dd>${usd(balance.credit_line_usd)}</dd></div>
      <div><dt>Spent in ${balance.month}</dt><dd id="month-spend">${usd(balance.month_spend_usd)}</dd></div>
      <div><dt>Monthly budget</dt><dd>${balance.budget_monthly_usd === null ? "none" : usd(balance.budget_monthly_usd)}</dd></div>
    </dl>
    ${balance.available_usd < 0 && html`<p class="error">You owe ${usd(-balance.available_usd)}: the next money in pays it first.</p>`}`}
    ${currentSession().payments?.cards && html`<${CardTopUp} client=${client} onCredited=${reload} />`}
    <${TopUp} client=${client} onCredited=${reload} />
  </section>`;
}

// ------------------------------------------------------------------------------------------
// Invoices: one a month (UTC), from the month the profile was made to this one

function months(since) {
  const out = [];
  const start = new Date(since);
  const now = new Date();
  let y = now.getUTCFullYear();
  let m = now.getUTCMonth();
  while (y > start.getUTCFullYear() || (y === start.getUTCFullYear() && m >= start.getUTCMonth())) {
    out.push(`${y}-${String(m + 1).padStart(2, "0")}`);
    if (--m < 0) {
      m = 11;
      y -= 1;
    }
  }
  return out;
}

function Invoices({ client }) {
  const periods = useMemo(() => months(client.created_at), [client.created_at]);
  const [period, setPeriod] = useState(periods[0]);
  const [invoice, error, reload] = useLoad(
    () => get(`/api/payments/invoice/${client.id}`, { period }),
    [client.id, period],
  );
  // A settled contract reaches the invoice once the journal has written it (a moment later).
  useEffect(() => {
    const timers = new Set();
    const off = live.on("contracts", (n) => {
      if (n.notice !== "contract_ended") return;
      [1000, 4000].forEach((ms) => {
        const t = setTimeout(() => (timers.delete(t), reload()), ms);
        timers.add(t);
      });
    });
    return () => {
      off();
      timers.forEach(clearTimeout);
    };
  }, [client.id]);
  const printable = `/api/payments/invoice/${client.id}?period=${period}&format=html`;
  return html`<section class="panel" id="invoices" aria-labelledby="invoices-title">
    <div class="chart-head"><h2 id="invoices-title">Invoices</h2>
      <div class="actions">
        <label class="inline">Month <select value=${period} onChange=${(e) => setPeriod(e.target.value)}>
          ${periods.map((p) => html`<option value=${p}>${p}</option>`)}</select></label>
        <button type="button" class="secondary" onClick=${reload}>Refresh</button>
      </div></div>
    <${ErrorBox} error=${error} />
    ${invoice && html`<p>Invoice <strong id="invoice-number">${invoice.invoice_number}</strong> for ${invoice.period}${": "}<a id="invoice-link" href=${printable}>printable invoice</a></p>
    <dl class="stats">
      <div><dt>Opening balance</dt><dd>${usd(invoice.opening_balance_usd)}</dd></div>
      <div><dt>Payments</dt><dd>${usd(invoice.payments_usd)}</dd></div>
      <div><dt>Charges</dt><dd id="invoice-charges">${usd(invoice.charges_usd)}</dd></div>
      <div><dt>Refunds</dt><dd>${usd(invoice.refunds_usd)}</dd></div>
      <div><dt>Closing balance</dt><dd>${usd(invoice.closing_balance_usd)}</dd></div>
    </dl>
    ${invoice.contracts.length === 0 ? html`<p>No contract closed in ${invoice.period} yet.</p>` : html`
    <table class="data" id="invoice-contracts" aria-label=${`Contracts on invoice ${invoice.invoice_number}`}>
      <thead><tr><th scope="col">Contract</th><th scope="col">Region</th><th scope="col">Status</th>
        <th scope="col">Size</th><th scope="col">Used</th><th scope="col">Usage</th>
        <th scope="col">Egress</th><th scope="col">Total</th></tr></thead>
      <tbody>${invoice.contracts.map((c) => html`<tr key=${c.contract_id} data-contract=${c.contract_id}>
        <td><code>${short(c.contract_id)}</code></td><td>${c.region}</td><td>${c.status}</td>
        <td class="num">${c.ram_gb} + ${c.vram_gb} GB</td><td class="num">${duration(c.used_sec)}</td>
        <td class="num">${usd(c.usage_usd)}</td><td class="num">${usd(c.egress_usd)}</td>
        <td class="num">${usd(c.total_cost_usd)}</td></tr>`)}</tbody>
      <tfoot><tr><th scope="row" colspan="7">Total</th><td class="num">${usd(invoice.contracts_total_usd)}</td></tr></tfoot>
    </table>`}`}
  </section>`;
}

// ------------------------------------------------------------------------------------------
// The renter profile every request, contract and bid is made for (the spec's `clients`)

function ProfileSetup({ onCreated }) {
  const [error, setError] = useState(null);
  const submit = async (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    try {
      onCreated(await post("/api/clients", v, { idempotent: true }));
    } catch (e) {
      setError(e);
    }
  };
  return html`<form class="panel" onSubmit=${submit} aria-labelledby="profile-title">
    <h2 id="profile-title">Your renter profile</h2>
    <p>Requests, contracts and bids are made for a profile; its location makes nearby nodes score higher.</p>
    <div class="grid">
      <${Field} label="Organization" name="org_name" required />
      <${Field} label="Latitude (optional)" name="latitude" type="number" min="-90" max="90" step="any" />
      <${Field} label="Longitude (optional)" name="longitude" type="number" min="-180" max="180" step="any" />
      <${Field} label="Prefer nearby nodes" name="prefer_local" type="checkbox" defaultChecked />
    </div>
    <${ErrorBox} error=${error} />
    <button type="submit">Create profile</button>
  </form>`;
}

// The page's sections, in order: each is a component given ({ client, regions }).
const SECTIONS = [
  ["balance", "Balance", Balance],
  ["browse", "Browse", Browse],
  ["request", "Request", RequestMatches],
  ["contracts", "Contracts", Contracts],
  ["bids", "Bids", Bids],
  ["invoices", "Invoices", Invoices],
];

function Renter({ session }) {
  const [clients, clientsError, reload] = useLoad(() => get("/api/clients"));
  const [clusters] = useLoad(() => get("/api/clusters"));
  const [refresh, setRefresh] = useState(0);
  const blocked = NeedsAccount({ session, roles: ["user", "admin"], what: "Renter" });
  if (blocked) return blocked;
  if (clientsError) return html`<${ErrorBox} error=${clientsError} />`;
  if (!clients) return html`<p class="loading">Loading…</p>`;
  if (!clients.clients.length) return html`<h1>Renter</h1><${ProfileSetup} onCreated=${reload} />`;
  const client = clients.clients[0];
  const regions = clusters ? clusters.clusters.map((c) => c.region) : [];
  const props = { client, regions, onTaken: () => setRefresh((n) => n + 1), refresh };
  return html`<div class="page-head"><h1>Renter</h1><span>${client.org_name}</span><${LiveBadge} /></div>
    <nav class="sections" aria-label="Sections"><ul>
      ${SECTIONS.map(([id, title]) => html`<li><a href=${"#" + id}>${title}</a></li>`)}</ul></nav>
    ${SECTIONS.map(([id, , Section]) => html`<${Section} key=${id} ...${props} />`)}`;
}

export function mount(main, session) {
  render(html`<${Renter} session=${session} />`, main);
}
