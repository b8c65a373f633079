// Billable metrics as Metronome defines them: created once and never edited, then archived. A
// create body is checked the way Metronome documents it (an aggregation type in any letter case, an
// aggregation key for every type but COUNT that is one of the property filter names, non-empty filter
// value lists); SQL metrics are not modelled.
import { badRequest, notFound } from './errors.js';
import {
  AGGREGATION_TYPES,
  type AggregationType,
  type BillableMetric,
  type BillableMetricDefinition,
  type EmulatorState,
  type EventTypeFilter,
  type PropertyFilter,
} from './state.js';

/** A billable metric as get and list answer it; archived_at only once archived. */
export interface BillableMetricView {
  id: string;
  name: string;
  aggregation_type: AggregationType;
  aggregation_key?: string;
  event_type_filter?: EventTypeFilter;
  property_filters?: PropertyFilter[];
  group_keys?: string[][];
  custom_fields: Record<string, string>;
  archived_at?: string;
}

export function billableMetricView(m: BillableMetric): BillableMetricView {
  const view: BillableMetricView = {
    id: m.id,
    name: m.name,
    aggregation_type: m.aggregation_type,
    custom_fields: { ...m.custom_fields },
  };
  if (m.aggregation_key !== undefined) view.aggregation_key = m.aggregation_key;
  if (m.event_type_filter) view.event_type_filter = structuredClone(m.event_type_filter);
  if (m.property_filters) view.property_filters = structuredClone(m.property_filters);
  if (m.group_keys) view.group_keys = structuredClone(m.group_keys);
  if (m.archivedAt !== null) view.archived_at = new Date(m.archivedAt).toISOString();
  return view;
}

export function findBillableMetric(state: EmulatorState, id: string): BillableMetric {
  const metric = state.metrics.get(id);
  if (!metric) throw notFound(`Billable metric not found: ${id}`);
  return metric;
}

function stringList(value: unknown, field: string): string[] | undefined {
  if (value === undefined || value === null) return undefined;
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string'))
    throw badRequest(`${field} must be an array of strings`);
  if (value.length === 0) throw badRequest(`${field} must be non-empty if present`);
  return [...value];
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

export function parseCreateBillableMetric(body: unknown): BillableMetricDefinition {
  if (!isObject(body)) throw badRequest('Request body must be a JSON object');
  if (typeof body.name !== 'string' || body.name === '') throw badRequest('name is required');
  if (body.sql !== undefined)
    throw badRequest('SQL billable metrics are not modelled by the emulator; use aggregation_type');
  const type =
    typeof body.aggregation_type === 'string'
      ? AGGREGATION_TYPES.find((t) => t === (body.aggregation_type as string).toUpperCase())
      : undefined;
  if (!type) throw badRequest(`aggregation_type must be one of ${AGGREGATION_TYPES.join(', ')}`);

  let eventTypeFilter: EventTypeFilter | undefined;
  if (body.event_type_filter !== undefined) {
    if (!isObject(body.event_type_filter)) throw badRequest('event_type_filter must be an object');
    const inValues = stringList(body.event_type_filter.in_values, 'event_type_filter.in_values');
    const notIn = stringList(body.event_type_filter.not_in_values, 'event_type_filter.not_in_values');
    eventTypeFilter = {
      ...(inValues ? { in_values: inValues } : {}),
      ...(notIn ? { not_in_values: notIn } : {}),
    };
  }

  let propertyFilters: PropertyFilter[] | undefined;
  if (body.property_filters !== undefined) {
    if (!Array.isArray(body.property_filters)) throw badRequest('property_filters must be an array');
    propertyFilters = body.property_filters.map((raw: unknown, i) => {
      if (!isObject(raw) || typeof raw.name !== 'string' || raw.name === '')
        throw badRequest(`property_filters[${i}].name is required`);
      if (raw.exists !== undefined && raw.exists !== null && typeof raw.exists !== 'boolean')
        throw badRequest(`property_filters[${i}].exists must be a boolean`);
      const inValues = stringList(raw.in_values, `property_filters[${i}].in_values`);
      const notIn = stringList(raw.not_in_values, `property_filters[${i}].not_in_values`);
      return {
        name: raw.name,
        ...(typeof raw.exists === 'boolean' ? { exists: raw.exists } : {}),
        ...(inValues ? { in_values: inValues } : {}),
        ...(notIn ? { not_in_values: notIn } : {}),
      };
    });
  }

  const key = body.aggregation_key;
  if (key !== undefined && typeof key !== 'string') throw badRequest('aggregation_key must be a string');
  if (type !== 'COUNT') {
    if (!key) throw badRequest(`aggregation_key is required for aggregation_type ${type}`);
    if (!propertyFilters?.some((f) => f.name === key))
      throw badRequest(`aggregation_key ${key} must be one of the property filter names`);
  }

  let groupKeys: string[][] | undefined;
  if (body.group_keys !== undefined) {
    if (
      !Array.isArray(body.group_keys) ||
      !body.group_keys.every((g: unknown) => Array.isArray(g) && g.every((k) => typeof k === 'string'))
    )
      throw badRequest('group_keys must be an array of arrays of strings');
    groupKeys = (body.group_keys as string[][]).map((g) => [...g]);
  }

  const customFields: Record<string, string> = {};
  if (body.custom_fields !== undefined) {
    if (!isObject(body.custom_fields)) throw badRequest('custom_fields must be an object of strings');
    for (const [k, v] of Object.entries(body.custom_fields)) {
      if (typeof v !== 'string') throw badRequest(`custom_fields.${k} must be a string`);
      customFields[k] = v;
    }
  }

  return {
    name: body.name,
    aggregation_type: type,
    ...(typeof key === 'string' && type !== 'COUNT' ? { aggregation_key: key } : {}),
    ...(eventTypeFilter ? { event_type_filter: eventTypeFilter } : {}),
    ...(propertyFilters ? { property_filters: propertyFilters } : {}),
    ...(groupKeys ? { group_keys: groupKeys } : {}),
    custom_fields: customFields,
  };
}

/** Archived metrics stop counting new events; archiving twice keeps the first archived_at. */
export function archiveBillableMetric(state: EmulatorState, id: string, now: number): BillableMetric {
  const metric = findBillableMetric(state, id);
  if (metric.archivedAt === null) metric.archivedAt = now;
  return metric;
}
