// `meterbox usage-tokens create|list|revoke --organization <id>`: read-only GET /v1/usage tokens for
// an organization's customer app. Output is for people; --json prints one JSON document instead.
import { type CliCommand, flags } from '../cli/command.js';
import { str } from '../cli/io.js';
import {
  createUsageToken,
  listUsageTokens,
  revokeUsageToken,
  type UsageTokenView,
} from '../credentials/usage-tokens.js';
import { usageTokenTtl } from './usage-tokens-routes.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

type Values = Record<string, string | boolean | undefined>;

function fail(message: string, usage: string): number {
  console.error(`meterbox: ${message}\nusage: meterbox ${usage}`);
  return 2;
}

function print(values: Values, json: unknown, lines: string[]): void {
  console.log(values.json ? JSON.stringify(json, null, 2) : lines.join('\n'));
}

function describeToken(token: UsageTokenView, now: Date): string {
  const state = token.revokedAt
    ? `revoked ${token.revokedAt.toISOString()}`
    : token.expiresAt <= now
      ? `expired ${token.expiresAt.toISOString()}`
      : `expires ${token.expiresAt.toISOString()}`;
  return `${token.id}  ${token.prefix}…  ${token.name}  ${state}`;
}

const createUsage = 'usage-tokens create --organization <id> [--name <name>] [--ttl-hours <hours>] [--json]';
const create: CliCommand = {
  summary: "create a read-only GET /v1/usage token for an organization's customer app (printed once)",
  usage: createUsage,
  options: flags(['organization', 'name', 'ttl-hours'], ['json']),
  async run(ctx, { values }) {
    const org = str(values, 'organization');
    if (!org || !UUID.test(org)) return fail('--organization <id> is required', createUsage);
    const name = str(values, 'name');
    if (name !== undefined && (name.length === 0 || name.length > 200))
      return fail('--name must be 1-200 characters', createUsage);
    const rawTtl = str(values, 'ttl-hours');
    if (rawTtl !== undefined && !/^[1-9]\d*$/.test(rawTtl))
      return fail('--ttl-hours must be a whole number of hours', createUsage);
    const ttl = usageTokenTtl(ctx.config, rawTtl === undefined ? undefined : Number(rawTtl));
    if ('error' in ttl) return fail(ttl.error.replace('ttlHours', '--ttl-hours'), createUsage);
    const token = await createUsageToken(ctx.db, org, {
      ...(name ? { name } : {}),
      ttlHours: ttl.ttlHours,
      now: ctx.clock.now(),
    });
    if (!token) return fail(`no organization ${org}`, createUsage);
    print(values, token, [
      `usage token ${token.id} (${token.name}), expires ${token.expiresAt.toISOString()}`,
      `token       ${token.token}`,
      'Store this token now: it is shown only once. It reads GET /v1/usage of this organization only.',
    ]);
    return 0;
  },
};

const listUsage = 'usage-tokens list --organization <id> [--json]';
const list: CliCommand = {
  summary: "list an organization's usage tokens (prefix only), expired and revoked ones included",
  usage: listUsage,
  options: flags(['organization'], ['json']),
  async run(ctx, { values }) {
    const org = str(values, 'organization');
    if (!org || !UUID.test(org)) return fail('--organization <id> is required', listUsage);
    const tokens = await listUsageTokens(ctx.db, org);
    const now = ctx.clock.now();
    print(
      values,
      tokens,
      tokens.length ? tokens.map((t) => describeToken(t, now)) : [`no usage tokens for organization ${org}`],
    );
    return 0;
  },
};

const revokeUsage = 'usage-tokens revoke --organization <id> <token id> [--json]';
const revoke: CliCommand = {
  summary: 'revoke a usage token; GET /v1/usage with it is then refused',
  usage: revokeUsage,
  options: flags(['organization'], ['json']),
  async run(ctx, { values, positionals }) {
    const org = str(values, 'organization');
    if (!org || !UUID.test(org)) return fail('--organization <id> is required', revokeUsage);
    const id = positionals[0];
    if (!id || positionals.length !== 1 || !UUID.test(id))
      return fail('one token id is required', revokeUsage);
    const token = await revokeUsageToken(ctx.db, org, id, ctx.clock.now());
    if (!token) return fail(`no usage token ${id} in organization ${org}`, revokeUsage);
    print(values, token, [describeToken(token, ctx.clock.now())]);
    return 0;
  },
};

export const usageTokenCommands: Record<string, CliCommand> = {
  'usage-tokens create': create,
  'usage-tokens list': list,
  'usage-tokens revoke': revoke,
};
