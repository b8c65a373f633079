// Customers and their ingest aliases, Metronome's rules: an alias belongs to one customer at a time
// (a second claim is a 409, and an archived customer keeps its aliases), setting aliases replaces
// the whole set, and moving an alias moves its usage, because events are attributed when read.
import { randomUUID } from 'node:crypto';
import { badRequest, conflict, notFound } from './errors.js';
import {
  type CreateCustomerInput,
  MAX_ALIAS_LENGTH,
  MAX_CUSTOMER_NAME_LENGTH,
  MAX_INGEST_ALIASES,
} from './options.js';
import type { Customer, EmulatorState } from './state.js';

/** The `Customer` of create's answer. */
export interface CustomerView {
  id: string;
  external_id: string;
  ingest_aliases: string[];
  name: string;
  custom_fields: Record<string, string>;
}

/** The `CustomerDetail` of get and list. */
export interface CustomerDetailView extends CustomerView {
  created_at: string;
  updated_at: string;
  archived_at: string | null;
  customer_config: { salesforce_account_id: string | null };
}

const iso = (ms: number) => new Date(ms).toISOString();

export const customerView = (c: Customer): CustomerView => ({
  id: c.id,
  external_id: c.external_id,
  ingest_aliases: [...c.ingest_aliases],
  name: c.name,
  custom_fields: { ...c.custom_fields },
});

export const customerDetailView = (c: Customer): CustomerDetailView => ({
  ...customerView(c),
  created_at: iso(c.createdAt),
  updated_at: iso(c.updatedAt),
  archived_at: c.archivedAt === null ? null : iso(c.archivedAt),
  customer_config: { salesforce_account_id: null },
});

export function findCustomer(state: EmulatorState, id: string): Customer {
  const customer = state.customers.get(id);
  if (!customer) throw notFound(`Customer not found: ${id}`);
  return customer;
}

/** Validated, de-duplicated aliases; a 409 when one belongs to a customer other than `ownerId`. */
function checkAliases(state: EmulatorState, aliases: unknown, ownerId?: string): string[] {
  if (!Array.isArray(aliases)) throw badRequest('ingest_aliases must be an array of strings');
  if (aliases.length > MAX_INGEST_ALIASES)
    throw badRequest(`ingest_aliases may hold at most ${MAX_INGEST_ALIASES} aliases`);
  const unique: string[] = [];
  for (const alias of aliases) {
    if (typeof alias !== 'string' || alias.length < 1 || alias.length > MAX_ALIAS_LENGTH)
      throw badRequest(`each ingest alias must be a string of 1 to ${MAX_ALIAS_LENGTH} characters`);
    if (!unique.includes(alias)) unique.push(alias);
  }
  for (const alias of unique) {
    const owner = state.aliases.get(alias);
    if (owner !== undefined && owner !== ownerId)
      throw conflict(`Ingest alias ${alias} is already in use by another customer`);
  }
  return unique;
}

function stringRecord(value: unknown, field: string): Record<string, string> {
  if (value === undefined) return {};
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw badRequest(`${field} must be an object of strings`);
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(value)) {
    if (typeof v !== 'string') throw badRequest(`${field}.${k} must be a string`);
    out[k] = v;
  }
  return out;
}

/** The create body as Metronome reads it (other fields, such as billing configuration, are ignored). */
export function parseCreateCustomer(body: unknown): CreateCustomerInput {
  if (typeof body !== 'object' || body === null || Array.isArray(body))
    throw badRequest('Request body must be a JSON object');
  const b = body as Record<string, unknown>;
  if (typeof b.name !== 'string' || b.name === '') throw badRequest('name is required');
  if (b.external_id !== undefined && typeof b.external_id !== 'string')
    throw badRequest('external_id must be a string');
  return {
    name: b.name,
    ...(b.ingest_aliases !== undefined ? { ingest_aliases: b.ingest_aliases as string[] } : {}),
    ...(typeof b.external_id === 'string' ? { external_id: b.external_id } : {}),
    custom_fields: stringRecord(b.custom_fields, 'custom_fields'),
  };
}

export function createCustomer(state: EmulatorState, input: CreateCustomerInput, now: number): Customer {
  // The deprecated external_id is an alias too; Metronome lists it among ingest_aliases.
  const requested = [...(input.external_id ? [input.external_id] : []), ...(input.ingest_aliases ?? [])];
  const aliases = checkAliases(state, requested);
  const id = randomUUID();
  const customer: Customer = {
    id,
    name: input.name.slice(0, MAX_CUSTOMER_NAME_LENGTH),
    external_id: input.external_id ?? aliases[0] ?? id,
    ingest_aliases: aliases,
    custom_fields: { ...(input.custom_fields ?? {}) },
    createdAt: now,
    updatedAt: now,
    archivedAt: null,
  };
  state.customers.set(id, customer);
  for (const alias of aliases) state.aliases.set(alias, id);
  return customer;
}

/** Replaces the customer's aliases (idempotent); aliases it drops become free for others. */
export function setIngestAliases(
  state: EmulatorState,
  customerId: string,
  aliases: unknown,
  now: number,
): Customer {
  const customer = findCustomer(state, customerId);
  const next = checkAliases(state, aliases, customer.id);
  for (const alias of customer.ingest_aliases) if (!next.includes(alias)) state.aliases.delete(alias);
  for (const alias of next) state.aliases.set(alias, customer.id);
  customer.ingest_aliases = next;
  customer.updatedAt = now;
  return customer;
}

/** Archiving cannot be undone; the customer keeps its aliases, so they stay taken. */
export function archiveCustomer(state: EmulatorState, customerId: string, now: number): Customer {
  const customer = findCustomer(state, customerId);
  if (customer.archivedAt === null) {
    customer.archivedAt = now;
    customer.updatedAt = now;
  }
  return customer;
}
