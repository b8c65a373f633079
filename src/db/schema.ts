// Kysely table types for the tables in migrations/. Keep in step with the SQL.
import type { ColumnType, Generated, Insertable, Selectable, Updateable } from 'kysely';

type Timestamp = ColumnType<Date, Date | string, Date | string>;
type DefaultTimestamp = ColumnType<Date, Date | string | undefined, Date | string>;
/** bigint columns come back from pg as strings; we write numbers. */
type BigIntColumn = ColumnType<string, number | bigint | string, number | bigint | string>;

export type SubscriptionStatus =
  | 'incomplete'
  | 'incomplete_expired'
  | 'trial'
  | 'active'
  | 'past_due'
  | 'canceled'
  | 'unpaid'
  | 'paused';
export const BILLABLE_STATUSES = ['active', 'trial'] as const satisfies readonly SubscriptionStatus[];

export type MeterEventName = 'temperature_readings' | 'active_sensors';
export const METER_EVENT_NAMES = [
  'temperature_readings',
  'active_sensors',
] as const satisfies readonly MeterEventName[];
/** Where usage is billed (migrations/0024): Stripe Billing Meters or Metronome. */
export type Destination = 'stripe' | 'metronome';
export const DESTINATIONS = ['stripe', 'metronome'] as const satisfies readonly Destination[];
export type OutboxStatus = 'pending' | 'delivered' | 'failed' | 'expired';
export const OUTBOX_STATUSES = [
  'pending',
  'delivered',
  'failed',
  'expired',
] as const satisfies readonly OutboxStatus[];

export interface OrganizationsTable {
  id: Generated<string>;
  name: string;
  created_at: DefaultTimestamp;
  /** Monthly threshold periods from this instant where Stripe gives none (migration 0076); null: UTC months. */
  billing_anchor_date: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
}

export interface ApiKeysTable {
  id: Generated<string>;
  organization_id: string;
  name: ColumnType<string, string | undefined, string>;
  prefix: string;
  key_hash: string;
  created_at: DefaultTimestamp;
  last_used_at: Timestamp | null;
  revoked_at: Timestamp | null;
}

/** migrations/0050: read-only GET /v1/usage tokens of one organization, stored hashed, expiring. */
export interface UsageTokensTable {
  id: Generated<string>;
  organization_id: string;
  name: ColumnType<string, string | undefined, string>;
  prefix: string;
  token_hash: string;
  created_at: DefaultTimestamp;
  expires_at: Timestamp;
  revoked_at: Timestamp | null;
}

export interface SubscriptionsTable {
  organization_id: string;
  stripe_customer_id: string | null;
  stripe_subscription_id: string | null;
  status: ColumnType<SubscriptionStatus, SubscriptionStatus | undefined, SubscriptionStatus>;
  current_period_end: Timestamp | null;
  stripe_event_created: Timestamp | null;
  created_at: DefaultTimestamp;
  updated_at: DefaultTimestamp;
}

export interface SensorsTable {
  id: Generated<string>;
  organization_id: string;
  name: string;
  active: ColumnType<boolean, boolean | undefined, boolean>;
  created_at: DefaultTimestamp;
  updated_at: DefaultTimestamp;
}

export interface TemperatureReadingsTable {
  sensor_id: string;
  recorded_at: Timestamp;
  organization_id: string;
  temperature_c: number;
  ingested_at: DefaultTimestamp;
  /** The meter_outbox row that billed this reading; null when the organization was not billable. */
  outbox_id: ColumnType<string | null, string | null | undefined, string | null>;
  /** migrations/0012: set when a usage correction voided the reading (kept for audit, never billed). */
  voided_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  correction_id: ColumnType<string | null, string | null | undefined, string | null>;
}

export interface MeterOutboxTable {
  id: ColumnType<string, never, never>;
  organization_id: string;
  event_name: MeterEventName;
  stripe_customer_id: string;
  value: BigIntColumn;
  occurred_at: Timestamp;
  dedupe_key: string | null;
  status: ColumnType<OutboxStatus, OutboxStatus | undefined, OutboxStatus>;
  identifier: string | null;
  attempts: ColumnType<number, number | undefined, number>;
  last_error: string | null;
  created_at: DefaultTimestamp;
  updated_at: DefaultTimestamp;
  delivered_at: Timestamp | null;
  /** v2: when Stripe answered 200; the row is delivered once the validation window passes (0016). */
  accepted_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  /** migrations/0012 (usage corrections). */
  kind: ColumnType<OutboxKind, OutboxKind | undefined, OutboxKind>;
  /** migrations/0031: random at insert (the database's default), part of the group's derived identifier. */
  nonce: ColumnType<string | null, never, never>;
  correction_id: ColumnType<string | null, string | null | undefined, string | null>;
  corrects_outbox_id: ColumnType<string | null, string | null | undefined, string | null>;
  correction_action: CorrectionAction | null;
  credit_note_required: ColumnType<boolean, boolean | undefined, boolean>;
  /** When the claim committed the row's identifier: the start of the destination's dedupe window (0023). */
  identified_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  /** migrations/0024: where the row is billed. */
  destination: ColumnType<Destination, Destination | undefined, Destination>;
  /** migrations/0024: the row of the same readings at another destination (the one readings name). */
  mirrors_outbox_id: ColumnType<string | null, string | null | undefined, string | null>;
  /** migrations/0051: W3C traceparent of the request that wrote the row; null without tracing. */
  traceparent: ColumnType<string | null, string | null | undefined, string | null>;
}

/** migrations/0012: usage rows bill readings; correction rows take billed readings back. */
export type OutboxKind = 'usage' | 'correction';
export type CorrectionAction = 'cancel' | 'compensate';

/** migrations/0012: one row per usage correction request. */
export interface UsageCorrectionsTable {
  id: ColumnType<string, never, never>;
  organization_id: string;
  sensor_id: string | null;
  range_from: Timestamp;
  range_to: Timestamp;
  reason: string;
  readings_voided: number;
  billed_readings_voided: number;
  unsent_readings_removed: ColumnType<number, number | undefined, number>;
  created_at: DefaultTimestamp;
}

export interface StripeEventsTable {
  event_id: string;
  event_type: string;
  stripe_created: Timestamp;
  livemode: ColumnType<boolean, boolean | undefined, boolean>;
  payload: ColumnType<unknown, string, string>;
  received_at: DefaultTimestamp;
  /** migrations/0055: the connected account a Connect webhook's event happened on; null: the platform's. */
  stripe_account: ColumnType<string | null, string | null | undefined, string | null>;
}

/** migrations/0055: the connected account (acct_…) a Stripe customer belongs to; none: the platform's. */
export interface StripeCustomerAccountsTable {
  stripe_customer_id: string;
  stripe_account: string;
  created_at: DefaultTimestamp;
}

/** migrations/0004: Stripe meter error reports, for the operator. */
export interface MeterErrorReportsTable {
  id: ColumnType<string, never, never>;
  event_id: string;
  meter_id: string | null;
  livemode: ColumnType<boolean, boolean | undefined, boolean>;
  stripe_created: Timestamp;
  summary: string | null;
  error_count: number | null;
  error_types: ColumnType<unknown, string | null | undefined, string | null>;
  validation_start: Timestamp | null;
  validation_end: Timestamp | null;
  received_at: DefaultTimestamp;
}

/** migrations/0002: the stored first answer to an Idempotency-Key of POST /v1/readings. */
export interface IdempotencyKeysTable {
  organization_id: string;
  key: string;
  request_hash: string;
  response_status: number;
  response_body: ColumnType<unknown, string, string>;
  created_at: DefaultTimestamp;
}

export interface SchemaMigrationsTable {
  version: number;
  name: string;
  applied_at: DefaultTimestamp;
}

/** migrations/0006: earliest next Stripe call per customer and meter (delivery pacing). */
/** Delivery state of one customer+meter: lease, pacing, backoff (0015). */
export interface MeterDeliveryKeysTable {
  /** migrations/0025: the organization whose rows the key delivers (its shard group on Citus; part of the key). */
  organization_id: string;
  stripe_customer_id: string;
  event_name: MeterEventName;
  lease_owner: string | null;
  lease_expires_at: Timestamp | null;
  /** When the claim last took the lease, on the database clock (0022). */
  leased_at: Timestamp | null;
  next_call_at: ColumnType<Date, Date | string | undefined, Date | string>;
  retry_at: Timestamp | null;
  /** A named hold (0023): 'meter_missing' while the key's meter is missing; no job meanwhile. */
  hold: 'meter_missing' | null;
  /** migrations/0024: the key's destination (part of the primary key). */
  destination: ColumnType<Destination, Destination | undefined, Destination>;
  /**
   * migrations/0080: the latest call of the key that may have been recorded (an ambiguous answer, or a
   * lease that ended without its settle), on the database clock; null: none since tracking began.
   */
  ambiguous_call_at: Timestamp | null;
}

/** migrations/0024: which destinations bill an organization's usage, by the usage's time. */
export interface OrganizationDestinationsTable {
  organization_id: string;
  destination: Destination;
  role: 'billing' | 'shadow';
  valid_from: Timestamp;
  valid_until: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  created_at: DefaultTimestamp;
}

/** A migration that cuts over at a Stripe billing-period boundary (0058). */
export interface OrganizationPeriodMigrationsTable {
  organization_id: string;
  cut_over_at: Timestamp;
  from_destination: Destination;
  to_destination: Destination;
  stripe_subscription_id: string;
  shadow_from: Timestamp;
  period_start: Timestamp;
  period_end: Timestamp;
  created_at: DefaultTimestamp;
}

/** Readings counted per organization and hour of ingested_at before their partition was dropped (0011). */
export interface ReadingsHourlyRollupTable {
  organization_id: string;
  hour: Timestamp;
  readings: BigIntColumn;
}

/** Delivered meter_outbox rows compacted per organization, meter, customer and hour (0011). */
export interface MeterUsageHourlyTable {
  organization_id: string;
  event_name: MeterEventName;
  stripe_customer_id: string;
  hour: Timestamp;
  value: BigIntColumn;
  events: BigIntColumn;
  last_occurred_at: Timestamp;
  last_value: BigIntColumn;
}

/** migrations/0017: the Stripe meters as the worker's meter catalog last found them. */
export interface StripeMeterCatalogTable {
  event_name: MeterEventName;
  state: 'active' | 'missing' | 'inactive' | 'mismatch' | 'unknown';
  meter_id: string | null;
  detail: ColumnType<string, string | undefined, string>;
  checked_at: DefaultTimestamp;
}

/** migrations/0018: per customer, meter and UTC hour, delivered usage that Stripe counted otherwise. */
export interface ReconciliationDriftTable {
  stripe_customer_id: string;
  event_name: MeterEventName;
  hour: Timestamp;
  sent: BigIntColumn;
  counted: BigIntColumn;
  rows_failed: ColumnType<number, number | undefined, number>;
  detected_at: DefaultTimestamp;
  checked_at: DefaultTimestamp;
  resolved_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  /** migrations/0030: the destination whose own totals were compared (part of the primary key). */
  destination: ColumnType<Destination, Destination | undefined, Destination>;
}

/** migrations/0030: per destination, the lease of the running reconciliation and its pass's cursor. */
export interface ReconciliationPassesTable {
  destination: Destination;
  lease_owner: string | null;
  lease_expires_at: Timestamp | null;
  pass_to: Timestamp | null;
  cursor: string | null;
  pass_started_at: Timestamp | null;
  customers_done: ColumnType<number, number | undefined, number>;
  calls: BigIntColumn;
  passes_completed: ColumnType<number, number | undefined, number>;
  last_pass_completed_at: Timestamp | null;
  last_pass_seconds: number | null;
  updated_at: DefaultTimestamp;
}

export interface DB {
  stripe_meter_catalog: StripeMeterCatalogTable;
  reconciliation_drift: ReconciliationDriftTable;
  reconciliation_passes: ReconciliationPassesTable;
  organizations: OrganizationsTable;
  api_keys: ApiKeysTable;
  subscriptions: SubscriptionsTable;
  sensors: SensorsTable;
  temperature_readings: TemperatureReadingsTable;
  readings_hourly_rollup: ReadingsHourlyRollupTable;
  meter_usage_hourly: MeterUsageHourlyTable;
  meter_outbox: MeterOutboxTable;
  usage_corrections: UsageCorrectionsTable;
  stripe_events: StripeEventsTable;
  stripe_customer_accounts: StripeCustomerAccountsTable;
  idempotency_keys: IdempotencyKeysTable;
  meter_error_reports: MeterErrorReportsTable;
  meter_delivery_keys: MeterDeliveryKeysTable;
  organization_destinations: OrganizationDestinationsTable;
  organization_period_migrations: OrganizationPeriodMigrationsTable;
  schema_migrations: SchemaMigrationsTable;
  usage_tokens: UsageTokensTable;
}

export type Organization = Selectable<OrganizationsTable>;
export type Sensor = Selectable<SensorsTable>;
export type Subscription = Selectable<SubscriptionsTable>;
export type OutboxRow = Selectable<MeterOutboxTable>;
export type NewOutboxRow = Insertable<MeterOutboxTable>;
export type SubscriptionUpdate = Updateable<SubscriptionsTable>;
