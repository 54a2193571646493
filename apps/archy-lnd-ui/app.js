// lnd's wallet state: GET /v1/state is the one REST call lnd answers without a macaroon.
const status = document.getElementById('status');

async function check() {
  try {
    const r = await fetch(`https://${location.hostname}:8080/v1/state`, { signal: AbortSignal.timeout(3000) });
    const body = await r.json();
    status.className = 'up';
    status.textContent = `lnd answering: ${body.state || r.status}`;
  } catch (e) {
    status.className = 'down';
    status.textContent = 'lnd is not answering (or its certificate is not accepted yet)';
  }
}

check();
setInterval(check, 10000);
