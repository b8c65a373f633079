// The standalone entry point as a process: one line with its URL, real SDK calls against it, clean
// exit on SIGTERM; and the `webhook` command posting a signed event.
import { type ChildProcess, spawn } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import Stripe from 'stripe';
import { afterEach, expect, it } from 'vitest';
import { waitFor } from './helpers.js';

const children: ChildProcess[] = [];
afterEach(() => {
  for (const child of children.splice(0)) if (child.exitCode === null) child.kill('SIGKILL');
});

function run(args: string[]) {
  const child = spawn(process.execPath, ['bin/stripe-emulator.mjs', ...args], {
    cwd: new URL('../', import.meta.url),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  const output = { stdout: '', stderr: '' };
  child.stdout?.on('data', (chunk: Buffer) => {
    output.stdout += chunk.toString();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    output.stderr += chunk.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, output, exited };
}

it('logs its URL, serves the SDK and exits 0 on SIGTERM', async () => {
  const { child, output, exited } = run(['--port', '0', '--sandbox', '--seed', '5']);
  const line = await waitFor(
    () => output.stdout,
    (text) => /listening on http:\/\/\S+:\d+/.test(text),
    { timeoutMs: 20_000 },
  );
  const port = Number(/listening on http:\/\/[^:]+:(\d+)/.exec(line)?.[1]);
  const stripe = new Stripe('sk_test_cli', {
    host: '127.0.0.1',
    port,
    protocol: 'http',
    maxNetworkRetries: 0,
  });
  await stripe.billing.meterEvents.create({
    event_name: 'temperature_readings',
    payload: { stripe_customer_id: 'cus_cli', value: '1' },
  });
  const state = (await (await fetch(`http://127.0.0.1:${port}/_emulator/state`)).json()) as {
    limits: { ratePerSecond: number };
    seed: number;
  };
  expect(state).toMatchObject({ limits: { ratePerSecond: 25 }, seed: 5 });
  child.kill('SIGTERM');
  expect(await exited).toBe(0);
}, 30_000);

it('builds, signs and posts one webhook event and prints the answer', async () => {
  const received: string[] = [];
  const server = createServer((req, res) => {
    received.push(String(req.headers['stripe-signature']));
    req.resume();
    req.on('end', () => res.writeHead(200).end('ok'));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/webhooks/stripe`;
    const { output, exited } = run([
      'webhook',
      'customer.subscription.updated',
      '--url',
      url,
      '--secret',
      'whsec_cli',
      '--customer',
      'cus_cli',
      '--status',
      'past_due',
    ]);
    expect(await exited).toBe(0);
    const printed = JSON.parse(output.stdout) as {
      sent: { type: string; data: { object: { status: string } } };
      response: { status: number };
    };
    expect(printed.sent.type).toBe('customer.subscription.updated');
    expect(printed.sent.data.object.status).toBe('past_due');
    expect(printed.response.status).toBe(200);
    expect(received[0]).toMatch(/^t=\d+,v1=[0-9a-f]{64}$/);
  } finally {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}, 30_000);
