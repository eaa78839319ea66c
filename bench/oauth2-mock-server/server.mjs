// oauth2-mock-server with the README's hooks, for bench/refresh.py --provider oauth2-mock-server.
// It accepts any refresh token. Its answers carry no `scope` (all asked for was granted)
// and an id_token with an address. Prints "listening <token url>" once it answers.
import { OAuth2Server } from 'oauth2-mock-server';

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');
server.service.on('beforeTokenSigning', (token) => { token.payload.email = 'bench@example.com'; });
server.service.on('beforeResponse', (response) => { delete response.body.scope; });
await server.start(Number(process.argv[2] || 0), '127.0.0.1');
console.log(`listening http://127.0.0.1:${server.address().port}/token`);
