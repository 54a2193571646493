// The connection strings a wallet needs, for the host this page was reached by.
const servers = document.getElementById('servers');
for (const [port, kind] of [[50001, 't (plaintext)'], [50002, 's (TLS)']]) {
  const li = document.createElement('li');
  const code = document.createElement('code');
  code.textContent = `${location.hostname}:${port}:${kind.slice(0, 1)}`;
  li.append(code, ` ${kind.slice(2)}`);
  servers.append(li);
}
