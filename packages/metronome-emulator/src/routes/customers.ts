// Customers as Metronome serves them: create (with ingest aliases), get, list (by ids, alias,
// archived), replace the ingest aliases, archive.
import {
  archiveCustomer,
  createCustomer,
  customerDetailView,
  customerView,
  findCustomer,
  parseCreateCustomer,
  setIngestAliases,
} from '../customers.js';
import { handle } from '../endpoint.js';
import { badRequest } from '../errors.js';
import { type App, type Ctx, parseJson } from '../http.js';
import { paginate, parseLimit } from '../pagination.js';
import type { Runtime } from '../runtime.js';

/** A list query parameter however the client sends it: repeated, comma-separated (the SDK's way), or both. */
export function listParam(c: Ctx, name: string): string[] | undefined {
  const values = [...(c.req.queries(name) ?? []), ...(c.req.queries(`${name}[]`) ?? [])];
  if (values.length === 0) return undefined;
  return values.flatMap((v) => v.split(',')).filter((v) => v !== '');
}

const requireId = (body: unknown): string => {
  const id = typeof body === 'object' && body !== null ? (body as { id?: unknown }).id : undefined;
  if (typeof id !== 'string' || id === '') throw badRequest('id is required');
  return id;
};

export function registerCustomerRoutes(app: App, rt: Runtime): void {
  app.post('/v1/customers', (c) =>
    handle(rt, c, 'customers', 'POST /v1/customers', ({ raw }) => {
      const customer = createCustomer(rt.state, parseCreateCustomer(parseJson(raw)), rt.clock());
      rt.log('info', 'customer created', { id: customer.id, aliases: customer.ingest_aliases });
      return { status: 200, body: { data: customerView(customer) } };
    }),
  );

  app.get('/v1/customers/:id', (c) =>
    handle(rt, c, 'customers', 'GET /v1/customers/:id', () => ({
      status: 200,
      body: {
        data: {
          ...customerDetailView(findCustomer(rt.state, c.req.param('id'))),
          current_billable_status: rt.invoicing.currentBillable(c.req.param('id'), rt.clock()),
        },
      },
    })),
  );

  app.get('/v1/customers', (c) =>
    handle(rt, c, 'customers', 'GET /v1/customers', () => {
      const ids = listParam(c, 'customer_ids');
      if (ids && ids.length > 100) throw badRequest('customer_ids may hold at most 100 ids');
      const alias = c.req.query('ingest_alias');
      const onlyArchived = c.req.query('only_archived') === 'true';
      const matching = [...rt.state.customers.values()].filter(
        (cu) =>
          (cu.archivedAt !== null) === onlyArchived &&
          (!ids || ids.includes(cu.id)) &&
          (alias === undefined || cu.ingest_aliases.includes(alias)),
      );
      const query = JSON.stringify({ ids, alias, onlyArchived });
      const page = paginate(matching, parseLimit(c.req.query('limit'), 100), c.req.query('next_page'), query);
      return { status: 200, body: { data: page.data.map(customerDetailView), next_page: page.next_page } };
    }),
  );

  app.post('/v1/customers/:id/setIngestAliases', (c) =>
    handle(rt, c, 'customers', `POST /v1/customers/${c.req.param('id')}/setIngestAliases`, ({ raw }) => {
      const body = parseJson(raw);
      const aliases =
        typeof body === 'object' && body !== null
          ? (body as { ingest_aliases?: unknown }).ingest_aliases
          : undefined;
      const customer = setIngestAliases(rt.state, c.req.param('id'), aliases, rt.clock());
      rt.log('info', 'ingest aliases set', { id: customer.id, aliases: customer.ingest_aliases });
      return { status: 200 };
    }),
  );

  app.post('/v1/customers/archive', (c) =>
    handle(rt, c, 'customers', 'POST /v1/customers/archive', ({ raw }) => {
      const customer = archiveCustomer(rt.state, requireId(parseJson(raw)), rt.clock());
      return { status: 200, body: { data: { id: customer.id } } };
    }),
  );
}
