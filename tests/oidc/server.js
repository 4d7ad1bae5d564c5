// A real OpenID Connect provider for dpiguard's tests: the certified `oidc-provider` package, with a
// small configuration and a minimal login form (no password: the test picks the account to log in).
//
// Configuration: one JSON file named by argv[2]:
//   { "port": 0, "issuer": "http://127.0.0.1:PORT",
//     "jwks": {"keys": [private JWKs; the first signs]},
//     "clients": [client metadata: client_id, client_secret, redirect_uris, post_logout_redirect_uris,
//                backchannel_logout_uri, ...}, ...],
//     "accounts": {"login": {"claims": {...}, "acr": "eidas1", "amr": ["pwd"]}} }
// Prints "READY <port>" on stdout once it listens.
import http from 'node:http';
import fs from 'node:fs';
import Provider from 'oidc-provider';

const conf = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const accounts = conf.accounts;

const provider = new Provider(conf.issuer, {
  clients: conf.clients,
  jwks: conf.jwks,
  cookies: { keys: ['dpiguard-test-cookie-key'] },
  findAccount: async (ctx, id) => {
    const account = accounts[id];
    if (!account) return undefined;
    return { accountId: id, claims: async () => ({ sub: id, ...account.claims }) };
  },
  claims: {
    acr: null, amr: null, sid: null, auth_time: null, iss: null,
    openid: ['sub'],
    profile: ['name', 'given_name', 'family_name', 'preferred_username'],
    groups: ['groups'],
    scope_all: ['SubjectNameID', 'SubjectRefPro', 'SubjectOrganization', 'given_name', 'family_name',
      'preferred_username'],
  },
  scopes: ['openid', 'profile', 'groups', 'scope_all', 'offline_access'],
  acrValues: ['eidas1', 'eidas2', 'low'],
  features: {
    devInteractions: { enabled: false },
    backchannelLogout: { enabled: true },
    claimsParameter: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: () => true },
  ttl: { IdToken: conf.id_token_ttl || 3600 },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('backchannel.error', (client, err) => console.error('backchannel.error', err.message));
provider.on('backchannel.success', (client) => console.log('backchannel.success', client.clientId));

const callback = provider.callback();

function readBody(req) {
  return new Promise((resolve) => {
    let data = '';
    req.on('data', (c) => { data += c; });
    req.on('end', () => resolve(new URLSearchParams(data)));
  });
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  const { prompt, params, session } = details;
  if (action === 'login' && req.method === 'POST') {
    const form = await readBody(req);
    const login = form.get('login');
    const account = accounts[login];
    if (!account) {
      res.writeHead(400, { 'content-type': 'text/plain' });
      res.end('unknown account');
      return;
    }
    const result = { login: { accountId: login, acr: account.acr, amr: account.amr } };
    await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
    return;
  }
  if (prompt.name === 'login') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(`<!doctype html><title>IdP login</title><form method="post" action="/interaction/${uid}/login">`
      + '<label>login <input name="login"></label><button>Sign in</button></form>');
    return;
  }
  // consent: granted at once (the test IdP's one client is first-party)
  const d = prompt.details;
  const grant = details.grantId ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
  if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
  if (d.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

const server = http.createServer((req, res) => {
  const path = new URL(req.url, conf.issuer).pathname;
  const m = path.match(/^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login))?$/);
  if (m) {
    interaction(req, res, m[1], m[2]).catch((err) => {
      console.error('interaction error', err);
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(String(err));
    });
    return;
  }
  callback(req, res);
});
server.listen(conf.port, '127.0.0.1', () => {
  console.log(`READY ${server.address().port}`);
});
