// The emulator's customer and webhook endpoint objects carry exactly the fields Stripe publishes
// for them, with Stripe's defaults for a new object, so code written against the emulator reads
// the same shape it will read from Stripe.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import { startStripeEmulator } from '../src/index.js';
import { emulatorTest, manualClock, sdk } from './helpers.js';

const it = emulatorTest(manualClock());

/*
 * Top-level keys of `resources.customer` and `resources.webhook_endpoint` in Stripe's published
 * OpenAPI fixtures: github.com/stripe/openapi, openapi/fixtures3.json (commit f6c2a48f, 2026-08-21).
 * Expandable and includable fields (sources, subscriptions, tax, tax_ids, cash_balance, …) are not
 * in the fixture and not in a default answer either.
 */
const STRIPE_CUSTOMER_KEYS = [
  'address',
  'balance',
  'created',
  'currency',
  'default_source',
  'delinquent',
  'description',
  'discount',
  'email',
  'id',
  'invoice_prefix',
  'invoice_settings',
  'livemode',
  'metadata',
  'name',
  'next_invoice_sequence',
  'object',
  'phone',
  'preferred_locales',
  'shipping',
  'tax_exempt',
  'test_clock',
];
const STRIPE_INVOICE_SETTINGS_KEYS = [
  'custom_fields',
  'default_payment_method',
  'footer',
  'rendering_options',
];
const STRIPE_WEBHOOK_ENDPOINT_KEYS = [
  'api_version',
  'application',
  'created',
  'description',
  'enabled_events',
  'id',
  'livemode',
  'metadata',
  'object',
  'status',
  'url',
];

const keys = (o: object) => Object.keys(o).sort();

describe('customer object', () => {
  it("has Stripe's published keys, on create and on retrieve", async ({ stripe, emu }) => {
    const created = await stripe.customers.create({ name: 'Cold Chain Ltd' });
    const fetched = await stripe.customers.retrieve(created.id);
    const raw = (await (
      await fetch(`${emu.url}/v1/customers/${created.id}`, {
        headers: { authorization: 'Bearer sk_test_emulator_0123456789' },
      })
    ).json()) as Record<string, unknown>;
    expect(keys(raw)).toEqual(STRIPE_CUSTOMER_KEYS);
    expect(keys(created)).toEqual(STRIPE_CUSTOMER_KEYS);
    expect(keys(fetched)).toEqual(STRIPE_CUSTOMER_KEYS);
    expect(keys(raw.invoice_settings as object)).toEqual(STRIPE_INVOICE_SETTINGS_KEYS);
    expect(keys(emu.createCustomer())).toEqual(STRIPE_CUSTOMER_KEYS);
  });

  it("answers Stripe's defaults for a new customer", async ({ stripe }) => {
    const created = await stripe.customers.create({ email: 'ops@example.com' });
    expect(created).toMatchObject({
      address: null,
      balance: 0,
      currency: null,
      default_source: null,
      delinquent: false,
      discount: null,
      invoice_settings: {
        custom_fields: null,
        default_payment_method: null,
        footer: null,
        rendering_options: null,
      },
      next_invoice_sequence: 1,
      phone: null,
      preferred_locales: [],
      shipping: null,
      tax_exempt: 'none',
      test_clock: null,
    });
    expect(created.invoice_prefix).toMatch(/^[A-F0-9]{7}$/);
  });

  it('fills the full object for customers read from an older persistence file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stripe-emu-'));
    try {
      const path = join(dir, 'state.json');
      const old = {
        version: 1,
        customers: [
          {
            id: 'cus_old',
            object: 'customer',
            created: 1,
            email: null,
            name: 'old',
            description: null,
            metadata: {},
            livemode: false,
          },
        ],
        webhookEndpoints: [
          {
            id: 'we_old',
            object: 'webhook_endpoint',
            url: 'http://127.0.0.1:1/hook',
            enabled_events: ['invoice.paid'],
            secret: 'whsec_old',
            status: 'enabled',
            description: null,
            metadata: {},
            api_version: null,
            created: 1,
            livemode: false,
          },
        ],
        events: [],
        counters: {},
      };
      await writeFile(path, JSON.stringify(old));
      const emu = await startStripeEmulator({ persistPath: path });
      try {
        const stripe = sdk(emu);
        const customer = await stripe.customers.retrieve('cus_old');
        expect(keys(customer)).toEqual(STRIPE_CUSTOMER_KEYS);
        expect(customer).toMatchObject({ name: 'old', balance: 0 });
        expect(keys(await stripe.webhookEndpoints.retrieve('we_old'))).toEqual(STRIPE_WEBHOOK_ENDPOINT_KEYS);
      } finally {
        await emu.stop();
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('webhook endpoint object', () => {
  it("has Stripe's published keys (plus the secret, on creation only)", async ({ stripe }) => {
    const created = await stripe.webhookEndpoints.create({
      url: 'http://127.0.0.1:9/webhooks/stripe',
      enabled_events: ['invoice.paid'],
    });
    expect(keys(created)).toEqual([...STRIPE_WEBHOOK_ENDPOINT_KEYS, 'secret'].sort());
    expect(created.application).toBeNull();
    expect(keys(await stripe.webhookEndpoints.retrieve(created.id))).toEqual(STRIPE_WEBHOOK_ENDPOINT_KEYS);
    const listed = await stripe.webhookEndpoints.list();
    expect(listed.data.map(keys)).toEqual([STRIPE_WEBHOOK_ENDPOINT_KEYS]);
  });
});
