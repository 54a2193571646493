// Whether bitcoind's RPC answers HTTP on this host. A no-cors fetch resolves (opaquely)
// when a server answered, whatever its status (bitcoind answers a GET with 405), and fails
// when nothing listens.
const ports = { 'bitcoin-knots': 8332, 'bitcoin-core': 8432 };
const status = document.getElementById('status');

async function answers(port) {
  try {
    await fetch(`http://${location.hostname}:${port}/`, { mode: 'no-cors', signal: AbortSignal.timeout(3000) });
    return true;
  } catch (e) {
    return false;
  }
}

async function check() {
  const up = [];
  for (const [app, port] of Object.entries(ports)) {
    if (await answers(port)) up.push(`${app} (:${port})`);
  }
  status.className = up.length ? 'up' : 'down';
  status.textContent = up.length ? `RPC answering: ${up.join(', ')}` : 'bitcoind is not answering';
}

check();
setInterval(check, 10000);
