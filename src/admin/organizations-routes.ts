// Admin API for organizations (behind the admin guard): create one with its first API key, manage keys, and
// link its subscription to a Stripe customer. Keys are returned whole only when created.
import { z } from 'zod';
import { CONNECTED_ACCOUNT } from '../billing/connect.js';
import type { Context } from '../context-type.js';
import { pgText } from '../db/input-types.js';
import { AppError, notFound } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import { parseBody } from '../http/validate.js';
import {
  AlreadyLinkedError,
  createApiKey,
  createOrganization,
  getOrganization,
  getSubscription,
  linkSubscription,
  listApiKeys,
  listOrganizations,
  revokeApiKey,
  SUBSCRIPTION_STATUSES,
  UnknownCursorError,
} from './organizations.js';

const PREFIX = '/admin/organizations';

const uuid = z.uuid();
const name = pgText('name').trim().min(1).max(200);

export const createOrganizationSchema = z.object({
  name,
  /** Name of the first API key. */
  keyName: name.optional(),
});
export const createKeySchema = z.object({ name: name.optional() });
export const linkSubscriptionSchema = z.object({
  stripeCustomerId: z
    .string()
    .regex(/^cus_\w+$/, { error: 'stripeCustomerId must be a Stripe customer id (cus_…)' }),
  status: z.enum(SUBSCRIPTION_STATUSES),
  stripeSubscriptionId: z
    .string()
    .regex(/^sub_\w+$/, { error: 'stripeSubscriptionId must be a Stripe subscription id (sub_…)' })
    .nullable()
    .optional(),
  stripeAccount: z
    .string()
    .regex(CONNECTED_ACCOUNT, { error: 'stripeAccount must be a Stripe connected account id (acct_…)' })
    .nullable()
    .optional()
    .describe(
      'Stripe Connect: the connected account the customer is on; its usage is sent with the Stripe-Account header. Absent or null: the platform account',
    ),
});

const date = z.iso.datetime();
const organizationSchema = z.object({ id: z.uuid(), name: z.string(), createdAt: date });
const apiKeySchema = z.object({
  id: z.uuid(),
  organizationId: z.uuid(),
  name: z.string(),
  prefix: z.string(),
  createdAt: date,
  lastUsedAt: date.nullable(),
  revokedAt: date.nullable(),
});
const createdKeySchema = apiKeySchema.extend({
  key: z.string().describe('the API key; shown only in this response'),
});
const subscriptionSchema = z.object({
  organizationId: z.uuid(),
  stripeCustomerId: z.string().nullable(),
  stripeSubscriptionId: z.string().nullable(),
  stripeAccount: z.string().nullable().describe('the connected account of the customer; null: the platform'),
  status: z.enum(SUBSCRIPTION_STATUSES),
  updatedAt: date,
});

export const organizationListQuery = z.object({
  limit: z.coerce
    .number({ error: 'limit must be a whole number from 1 to 500' })
    .int({ error: 'limit must be a whole number from 1 to 500' })
    .min(1, { error: 'limit must be a whole number from 1 to 500' })
    .max(500, { error: 'limit must be a whole number from 1 to 500' })
    .default(100),
  cursor: z.uuid({ error: 'cursor must be the nextCursor of a previous page' }).optional(),
});
const organizationListItemSchema = organizationSchema.extend({
  billable: z
    .boolean()
    .describe(
      'billed now: subscription active or trial, and a customer at the destination billing it (a Stripe customer, or at Metronome the customer with its ingest alias)',
    ),
  subscriptionStatus: z.enum(SUBSCRIPTION_STATUSES).nullable(),
  stripeCustomerId: z.string().nullable(),
});

/** Path ids that are not UUIDs name nothing: 404 rather than a database cast error. */
function idParam(value: string | undefined, what: string): string {
  const parsed = uuid.safeParse(value);
  if (!parsed.success) throw notFound(what);
  return parsed.data;
}

export function organizationAdminRoutes(ctx: Pick<Context, 'db' | 'clock' | 'config'>): HttpModule {
  const routes = documentedRoutes(PREFIX);

  routes.route(
    {
      method: 'post',
      path: '/admin/organizations',
      summary: 'Create an organization and its first API key (the key is shown only here)',
      tag: 'admin',
      security: 'admin',
      body: createOrganizationSchema,
      responses: {
        201: {
          description: 'the organization and its first key',
          schema: z.object({ organization: organizationSchema, apiKey: createdKeySchema }),
        },
      },
    },
    async (c) => {
      const input = await parseBody(c, createOrganizationSchema);
      const created = await ctx.db.transaction().execute((trx) =>
        createOrganization(trx, {
          name: input.name,
          keyName: input.keyName,
          destination: ctx.config.DEFAULT_DESTINATION,
        }),
      );
      return c.json(created, 201);
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/organizations',
      summary: 'List organizations, oldest first (cursor pagination, limit ≤ 500)',
      tag: 'admin',
      security: 'admin',
      query: organizationListQuery,
      responses: {
        200: {
          description: 'a page of organizations',
          schema: z.object({
            organizations: z.array(organizationListItemSchema),
            nextCursor: z
              .string()
              .nullable()
              .describe('pass as `cursor` for the next page; null on the last'),
          }),
        },
      },
    },
    async (c) => {
      const parsed = organizationListQuery.safeParse(c.req.query());
      if (!parsed.success) {
        throw new AppError(
          400,
          'bad_request',
          'the query string is invalid',
          parsed.error.issues.map((i) => ({ field: i.path.map(String).join('.'), message: i.message })),
        );
      }
      try {
        return c.json(await listOrganizations(ctx.db, parsed.data));
      } catch (err) {
        if (err instanceof UnknownCursorError)
          throw new AppError(400, 'bad_request', err.message, [{ field: 'cursor', message: err.message }]);
        throw err;
      }
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/organizations/{id}',
      summary: 'An organization and its subscription',
      tag: 'admin',
      security: 'admin',
      responses: {
        200: {
          description: 'the organization',
          schema: z.object({
            organization: organizationSchema,
            subscription: subscriptionSchema.nullable(),
          }),
        },
      },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      const organization = await getOrganization(ctx.db, id);
      if (!organization) throw notFound('organization');
      return c.json({ organization, subscription: await getSubscription(ctx.db, id) });
    },
  );

  routes.route(
    {
      method: 'post',
      path: '/admin/organizations/{id}/keys',
      summary: 'Create another API key (shown only in this response)',
      tag: 'admin',
      security: 'admin',
      body: createKeySchema,
      responses: { 201: { description: 'the new key', schema: createdKeySchema } },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      // The body is optional here: an empty one means a key named "default".
      const input = (await c.req.text()).trim() === '' ? {} : await parseBody(c, createKeySchema);
      const key = await ctx.db.transaction().execute((trx) => createApiKey(trx, id, input.name));
      if (!key) throw notFound('organization');
      return c.json(key, 201);
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/organizations/{id}/keys',
      summary: "List an organization's API keys (display prefix only), revoked ones included",
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'the keys', schema: z.object({ keys: z.array(apiKeySchema) }) } },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      if (!(await getOrganization(ctx.db, id))) throw notFound('organization');
      return c.json({ keys: await listApiKeys(ctx.db, id) });
    },
  );

  routes.route(
    {
      method: 'delete',
      path: '/admin/organizations/{id}/keys/{keyId}',
      summary: 'Revoke an API key (idempotent); requests with it are then 401',
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'the revoked key', schema: apiKeySchema } },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      const keyId = idParam(c.req.param('keyId'), 'API key');
      const key = await revokeApiKey(ctx.db, keyId, ctx.clock.now(), id);
      if (!key) throw notFound('API key');
      return c.json(key);
    },
  );

  routes.route(
    {
      method: 'put',
      path: '/admin/organizations/{id}/subscription',
      summary: "Link the organization's subscription to a Stripe customer and set its status",
      tag: 'admin',
      security: 'admin',
      body: linkSubscriptionSchema,
      responses: { 200: { description: 'the subscription', schema: subscriptionSchema } },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      const input = await parseBody(c, linkSubscriptionSchema);
      try {
        const subscription = await linkSubscription(ctx.db, id, input, ctx.clock.now());
        if (!subscription) throw notFound('organization');
        return c.json(subscription);
      } catch (err) {
        if (err instanceof AlreadyLinkedError) throw new AppError(409, 'conflict', err.message);
        throw err;
      }
    },
  );

  return routes;
}
