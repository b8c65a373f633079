// `meterbox org create|link` and `meterbox key create|list|revoke`: the admin organization
// functions from the command line. Output is for people; --json prints one JSON document instead.
import { CONNECTED_ACCOUNT } from '../billing/connect.js';
import { type CliCommand, flags } from '../cli/command.js';
import { str } from '../cli/io.js';
import type { Context } from '../context-type.js';
import { findCustomer, metronomeAlias } from '../metering/metronome.js';
import { DestinationChangeError, prepareDestination } from './destinations.js';
import {
  AlreadyLinkedError,
  type ApiKeyView,
  createApiKey,
  createOrganization,
  linkMetronomeSubscription,
  linkSubscription,
  listApiKeys,
  listOrganizations,
  NotOnMetronomeError,
  type OrganizationListItem,
  revokeApiKey,
  SUBSCRIPTION_STATUSES,
} from './organizations.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

type Values = Record<string, string | boolean | undefined>;

function fail(message: string, usage: string): number {
  console.error(`meterbox: ${message}\nusage: meterbox ${usage}`);
  return 2;
}

function print(values: Values, json: unknown, lines: string[]): void {
  console.log(values.json ? JSON.stringify(json, null, 2) : lines.join('\n'));
}

function describeKey(key: ApiKeyView): string {
  const state = key.revokedAt ? `revoked ${key.revokedAt.toISOString()}` : 'active';
  const used = key.lastUsedAt ? `last used ${key.lastUsedAt.toISOString()}` : 'never used';
  return `${key.id}  ${key.prefix}…  ${key.name}  ${state}  ${used}`;
}

const ONCE = 'Store this key now: it is shown only once.';

const orgCreateUsage = 'org create --name <name> [--key-name <name>] [--json]';
const orgCreate: CliCommand = {
  summary: 'create an organization and print its first API key',
  usage: orgCreateUsage,
  options: flags(['name', 'key-name'], ['json']),
  async run(ctx: Context, { values }) {
    const name = str(values, 'name');
    if (!name || name.length > 200) return fail('--name (1-200 characters) is required', orgCreateUsage);
    const keyName = str(values, 'key-name');
    const created = await ctx.db.transaction().execute((trx) =>
      createOrganization(trx, {
        name,
        ...(keyName ? { keyName } : {}),
        destination: ctx.config.DEFAULT_DESTINATION,
      }),
    );
    print(values, created, [
      `organization ${created.organization.id} (${created.organization.name})`,
      `api key      ${created.apiKey.key}`,
      ONCE,
    ]);
    return 0;
  },
};

function describeOrganization(org: OrganizationListItem): string {
  const state = org.billable ? 'billable' : `not billable (${org.subscriptionStatus ?? 'no subscription'})`;
  return `${org.id}  ${org.createdAt.toISOString()}  ${state}  ${org.stripeCustomerId ?? '-'}  ${org.name}`;
}

const orgListUsage = 'org list [--json]';
const orgList: CliCommand = {
  summary: 'list every organization: id, created, billable state, Stripe customer, name',
  usage: orgListUsage,
  options: flags([], ['json']),
  async run(ctx, { values }) {
    // Page through all of them (keyset pages of 500), one line each as they come.
    const all: OrganizationListItem[] = [];
    let cursor: string | undefined;
    do {
      const page = await listOrganizations(ctx.db, { limit: 500, cursor });
      if (!values.json) for (const org of page.organizations) console.log(describeOrganization(org));
      all.push(...page.organizations);
      cursor = page.nextCursor ?? undefined;
    } while (cursor);
    if (values.json) console.log(JSON.stringify(all, null, 2));
    else if (all.length === 0) console.log('no organizations');
    return 0;
  },
};

const orgLinkUsage = `org link --organization <id> (--customer <cus_…> [--account <acct_…>] | --metronome) [--status ${SUBSCRIPTION_STATUSES.join('|')}] [--json]`;
const orgLink: CliCommand = {
  summary:
    "link an organization's subscription to a Stripe customer, or (--metronome) make one billed at Metronome billable",
  usage: orgLinkUsage,
  options: flags(['organization', 'customer', 'status', 'account'], ['json', 'metronome']),
  async run(ctx, { values }) {
    const org = str(values, 'organization');
    const customer = str(values, 'customer');
    const status = str(values, 'status') ?? 'active';
    if (!org || !UUID.test(org)) return fail('--organization <id> is required', orgLinkUsage);
    const known = SUBSCRIPTION_STATUSES.find((s) => s === status);
    if (!known) return fail(`--status must be one of ${SUBSCRIPTION_STATUSES.join(', ')}`, orgLinkUsage);
    if (values.metronome) {
      if (customer || values.account !== undefined)
        return fail('--customer and --account exclude --metronome', orgLinkUsage);
      return linkAtMetronome(ctx, values, org, known);
    }
    if (!customer || !/^cus_\w+$/.test(customer))
      return fail('--customer <cus_…> (or --metronome) is required', orgLinkUsage);
    // Stripe Connect: the customer is on a connected account; its usage carries Stripe-Account.
    const account = str(values, 'account');
    if (account !== undefined && !CONNECTED_ACCOUNT.test(account))
      return fail('--account must be a Stripe connected account id (acct_…)', orgLinkUsage);
    try {
      const linked = await linkSubscription(
        ctx.db,
        org,
        { stripeCustomerId: customer, status: known, ...(account ? { stripeAccount: account } : {}) },
        ctx.clock.now(),
      );
      if (!linked) return fail(`no organization ${org}`, orgLinkUsage);
      print(values, linked, [
        `organization ${org} linked to ${customer}${account ? ` on connected account ${account}` : ''} (${known})`,
      ]);
      return 0;
    } catch (err) {
      if (err instanceof AlreadyLinkedError) return fail(err.message, orgLinkUsage);
      throw err;
    }
  },
};

/**
 * `org link --metronome`: an organization billed at Metronome becomes billable without a Stripe
 * customer. Its Metronome customer (the one with its ingest alias) is found or created first, so the
 * first usage sent is attributed; then the subscription's status is set.
 */
async function linkAtMetronome(
  ctx: Context,
  values: Values,
  org: string,
  status: (typeof SUBSCRIPTION_STATUSES)[number],
): Promise<number> {
  if (!ctx.metronome) {
    console.error('meterbox: METRONOME_BEARER_TOKEN is not set; org link --metronome needs it');
    return 1;
  }
  try {
    // Refuse before creating anything at Metronome for an organization billed elsewhere.
    const linked = await ctx.db.transaction().execute(async (trx) => {
      const view = await linkMetronomeSubscription(trx, org, status, ctx.clock.now());
      if (view) await prepareDestination({ db: trx, metronome: ctx.metronome }, org, 'metronome');
      return view;
    });
    if (!linked) return fail(`no organization ${org}`, orgLinkUsage);
    const found = await findCustomer(ctx.metronome, org);
    print(values, { ...linked, metronomeCustomerId: found?.id ?? null, ingestAlias: metronomeAlias(org) }, [
      `organization ${org} billable at Metronome (${status}): customer ${found?.id ?? '?'} alias ${metronomeAlias(org)}`,
    ]);
    return 0;
  } catch (err) {
    if (err instanceof NotOnMetronomeError || err instanceof DestinationChangeError)
      return fail(err.message, orgLinkUsage);
    throw err;
  }
}

const keyCreateUsage = 'key create --organization <id> [--name <name>] [--json]';
const keyCreate: CliCommand = {
  summary: 'create another API key for an organization',
  usage: keyCreateUsage,
  options: flags(['organization', 'name'], ['json']),
  async run(ctx, { values }) {
    const org = str(values, 'organization');
    if (!org || !UUID.test(org)) return fail('--organization <id> is required', keyCreateUsage);
    const name = str(values, 'name');
    const key = await ctx.db.transaction().execute((trx) => createApiKey(trx, org, name));
    if (!key) return fail(`no organization ${org}`, keyCreateUsage);
    print(values, key, [`key     ${key.id} (${key.name})`, `api key ${key.key}`, ONCE]);
    return 0;
  },
};

const keyListUsage = 'key list --organization <id> [--json]';
const keyList: CliCommand = {
  summary: "list an organization's API keys (prefix only)",
  usage: keyListUsage,
  options: flags(['organization'], ['json']),
  async run(ctx, { values }) {
    const org = str(values, 'organization');
    if (!org || !UUID.test(org)) return fail('--organization <id> is required', keyListUsage);
    const keys = await listApiKeys(ctx.db, org);
    print(values, keys, keys.length ? keys.map(describeKey) : [`no keys for organization ${org}`]);
    return 0;
  },
};

const keyRevokeUsage = 'key revoke <key id> [--json]';
const keyRevoke: CliCommand = {
  summary: 'revoke an API key; requests with it are then refused',
  usage: keyRevokeUsage,
  options: flags([], ['json']),
  async run(ctx, { values, positionals }) {
    const id = positionals[0];
    if (!id || positionals.length !== 1 || !UUID.test(id))
      return fail('one key id is required', keyRevokeUsage);
    const key = await revokeApiKey(ctx.db, id, ctx.clock.now());
    if (!key) return fail(`no API key ${id}`, keyRevokeUsage);
    print(values, key, [describeKey(key)]);
    return 0;
  },
};

export const organizationCommands: Record<string, CliCommand> = {
  'org create': orgCreate,
  'org list': orgList,
  'org link': orgLink,
  'key create': keyCreate,
  'key list': keyList,
  'key revoke': keyRevoke,
};
