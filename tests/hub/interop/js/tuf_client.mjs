// An independent TUF client for the interop tests: tuf-js's Updater over mutual TLS.
//
//   node tuf_client.mjs --metadata-url URL --targets-url URL --root FILE --target NAME \
//        --out DIR --cert FILE --key FILE --ca FILE [--timeout-ms N]
//
// Trusts FILE as root (version 1, or whatever the caller pins), refreshes the
// repository at --metadata-url, downloads --target from --targets-url (hash-prefixed
// names: the repository uses consistent snapshots) and prints one JSON line:
//   {"ok": true, "sha256": "<hex of the downloaded bytes>", "root_version": N, "fetched": [[url, status], ...]}
//   {"ok": false, "error": "<class>: <message>", "root_version": N, "fetched": [...]}
// and exits 0 on success, 1 on a refusal, 2 on bad arguments.

import { createHash } from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import { createRequire } from 'node:module';
import path from 'node:path';
import { Readable } from 'node:stream';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const { BaseFetcher, Updater } = require('tuf-js');
// The Updater stops walking root versions only on *its own* DownloadHTTPError
// with status 403/404, so the fetcher must throw that class (not exported at the top).
const { DownloadHTTPError } = require('tuf-js/dist/error.js');

class MutualTLSFetcher extends BaseFetcher {
  constructor({ cert, key, ca, timeoutMs }) {
    super();
    // One keep-alive agent presenting the device's certificate, trusting only the hub's CA.
    this.agent = new https.Agent({ cert, key, ca, keepAlive: true, maxSockets: 1 });
    this.timeoutMs = timeoutMs;
    this.fetched = [];
  }

  fetch(url) {
    return new Promise((resolve, reject) => {
      const request = https.get(url, { agent: this.agent, timeout: this.timeoutMs }, (response) => {
        const status = response.statusCode ?? 0;
        this.fetched.push([url, status]);
        if (status >= 400) {
          response.resume();
          reject(new DownloadHTTPError(`HTTP ${status} for ${url}`, status));
          return;
        }
        resolve(Readable.toWeb(response));
      });
      request.on('timeout', () => request.destroy(new Error(`timed out after ${this.timeoutMs} ms: ${url}`)));
      request.on('error', (error) => {
        this.fetched.push([url, null]);
        reject(error);
      });
    });
  }

  close() {
    this.agent.destroy();
  }
}

function arguments_() {
  const { values } = parseArgs({
    options: {
      'metadata-url': { type: 'string' },
      'targets-url': { type: 'string' },
      root: { type: 'string' },
      target: { type: 'string' },
      out: { type: 'string' },
      cert: { type: 'string' },
      key: { type: 'string' },
      ca: { type: 'string' },
      'timeout-ms': { type: 'string', default: '10000' },
    },
    strict: true,
  });
  for (const name of ['metadata-url', 'targets-url', 'root', 'target', 'out', 'cert', 'key', 'ca']) {
    if (!values[name]) throw new Error(`--${name} is required`);
  }
  return values;
}

function rootVersion(metadataDir) {
  try {
    return JSON.parse(fs.readFileSync(path.join(metadataDir, 'root.json'))).signed.version;
  } catch {
    return null;
  }
}

async function main() {
  let args;
  try {
    args = arguments_();
  } catch (error) {
    process.stdout.write(JSON.stringify({ ok: false, error: `UsageError: ${error.message}` }) + '\n');
    return 2;
  }
  const metadataDir = path.join(args.out, 'metadata');
  const targetDir = path.join(args.out, 'targets');
  fs.mkdirSync(metadataDir, { recursive: true });
  fs.mkdirSync(targetDir, { recursive: true });
  fs.copyFileSync(args.root, path.join(metadataDir, 'root.json'));
  const fetcher = new MutualTLSFetcher({
    cert: fs.readFileSync(args.cert),
    key: fs.readFileSync(args.key),
    ca: fs.readFileSync(args.ca),
    timeoutMs: Number(args['timeout-ms']),
  });
  let outcome;
  try {
    const updater = new Updater({
      metadataDir,
      metadataBaseUrl: args['metadata-url'],
      targetDir,
      targetBaseUrl: args['targets-url'],
      fetcher,
      config: { fetchRetries: 0 },
    });
    await updater.refresh();
    const info = await updater.getTargetInfo(args.target);
    if (info === undefined) {
      throw Object.assign(new Error(`no target ${args.target} in the repository`), {
        name: 'TargetNotFoundError',
      });
    }
    const file = await updater.downloadTarget(info);
    const sha256 = createHash('sha256').update(fs.readFileSync(file)).digest('hex');
    outcome = { ok: true, sha256 };
  } catch (error) {
    const name = error?.constructor?.name && error.constructor.name !== 'Error'
      ? error.constructor.name
      : (error?.name ?? 'Error');
    outcome = { ok: false, error: `${name}: ${error?.message ?? String(error)}` };
  } finally {
    fetcher.close();
  }
  outcome.root_version = rootVersion(metadataDir);
  outcome.fetched = fetcher.fetched;
  process.stdout.write(JSON.stringify(outcome) + '\n');
  return outcome.ok ? 0 : 1;
}

process.exitCode = await main();
