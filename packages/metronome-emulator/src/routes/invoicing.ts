// A migration's Metronome surface: a customer's billable status (set now or from a future instant:
// unbillable while it shadows Stripe, billable from the cut-over), contracts on a rate card, and the
// invoices and invoice breakdowns that price the usage of those contracts.
import { findCustomer } from '../customers.js';
import { handle } from '../endpoint.js';
import { badRequest, notFound } from '../errors.js';
import { type App, parseJson } from '../http.js';
import { breakdowns, type Contract, invoices } from '../invoicing.js';
import { paginate, parseLimit } from '../pagination.js';
import { parseRfc3339 } from '../rules.js';
import type { Runtime } from '../runtime.js';

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

function time(value: unknown, field: string): number {
  const ms = typeof value === 'string' ? parseRfc3339(value) : undefined;
  if (ms === undefined) throw badRequest(`${field} must be an RFC 3339 date-time`);
  return ms;
}

let contractSeq = 0;

export function registerInvoicingRoutes(app: App, rt: Runtime): void {
  app.post('/v1/customers/:id/setBillableStatus', (c) =>
    handle(rt, c, 'customers', `POST /v1/customers/${c.req.param('id')}/setBillableStatus`, ({ raw }) => {
      const customer = findCustomer(rt.state, c.req.param('id'));
      const body = parseJson(raw);
      if (!isObject(body)) throw badRequest('Request body must be a JSON object');
      const value = body.billable_status;
      if (value !== 'billable' && value !== 'unbillable')
        throw badRequest('billable_status must be billable or unbillable');
      const effectiveAt =
        body.effective_at === undefined ? rt.clock() : time(body.effective_at, 'effective_at');
      rt.invoicing.setBillable(customer.id, { value, effectiveAt });
      rt.log('info', 'billable status set', { id: customer.id, value, effectiveAt });
      return { status: 200, body: { data: { id: customer.id } } };
    }),
  );

  app.post('/v1/contracts/create', (c) =>
    handle(rt, c, 'customers', 'POST /v1/contracts/create', ({ raw }) => {
      const body = parseJson(raw);
      if (!isObject(body)) throw badRequest('Request body must be a JSON object');
      const customer = findCustomer(rt.state, String(body.customer_id ?? ''));
      const rateCardId = String(body.rate_card_id ?? '');
      if (!rt.invoicing.rateCards.has(rateCardId)) throw notFound(`rate card ${rateCardId} not found`);
      const startingAt = time(body.starting_at, 'starting_at');
      // Metronome's contracts start and end on hour boundaries.
      if (startingAt % 3_600_000 !== 0) throw badRequest('starting_at must be on an hour boundary');
      const endingBefore =
        body.ending_before === undefined ? null : time(body.ending_before, 'ending_before');
      if (endingBefore !== null && (endingBefore <= startingAt || endingBefore % 3_600_000 !== 0))
        throw badRequest('ending_before must be an hour boundary after starting_at');
      contractSeq += 1;
      const contract: Contract = {
        id: `contract-${contractSeq.toString().padStart(6, '0')}-${customer.id.slice(0, 8)}`,
        customer_id: customer.id,
        rate_card_id: rateCardId,
        startingAt,
        endingBefore,
        createdAt: rt.clock(),
      };
      rt.invoicing.contracts.set(contract.id, contract);
      return { status: 200, body: { data: { id: contract.id } } };
    }),
  );

  app.get('/v1/customers/:id/invoices', (c) =>
    handle(rt, c, 'customers', 'GET /v1/customers/:id/invoices', () => {
      const customer = findCustomer(rt.state, c.req.param('id'));
      const all = invoices(rt.state, rt.invoicing, customer.id, rt.clock());
      const page = paginate(all, parseLimit(c.req.query('limit'), 25), c.req.query('next_page'), customer.id);
      return { status: 200, body: page };
    }),
  );

  app.get('/v1/customers/:id/invoices/breakdowns', (c) =>
    handle(rt, c, 'customers', 'GET /v1/customers/:id/invoices/breakdowns', () => {
      const customer = findCustomer(rt.state, c.req.param('id'));
      const startingOn = time(c.req.query('starting_on'), 'starting_on');
      const endingBefore = time(c.req.query('ending_before'), 'ending_before');
      if (endingBefore <= startingOn) throw badRequest('ending_before must be after starting_on');
      const size = (c.req.query('window_size') ?? 'DAY').toUpperCase();
      if (size !== 'HOUR' && size !== 'DAY') throw badRequest('window_size must be HOUR or DAY');
      const all = breakdowns(
        rt.state,
        rt.invoicing,
        customer.id,
        { startingOn, endingBefore, windowSize: size },
        rt.clock(),
      );
      const query = JSON.stringify([customer.id, startingOn, endingBefore, size]);
      const page = paginate(all, parseLimit(c.req.query('limit'), 100), c.req.query('next_page'), query);
      return { status: 200, body: page };
    }),
  );
}
