// Switches that break one rule of the modelled design on purpose. Each invariant of the simulation must
// catch what it guards: test/sim/mutations.test.ts turns each switch on and expects a failing seed within
// a bounded number of seeds (the seed it found is kept there as a regression seed).

export const MUTATIONS = {
  deferredBlocksWrites:
    "a follow-up deferred to the future counts as the key's queued job: ingestion's job is refused and the sweep skips the key",
  wrongDestination:
    'ingestion routes a reading of the last minutes before a cut-over by the API host clock, not by the reading time',
  leaseFromHostClock:
    "a claim's lease (and its windows) start at the worker's wall clock, not the database's",
  leaseLearnsStalls:
    'a worker times its claims and renewals on the monotonic clock, its own freezes included: a freeze during a claim grows its leases (and its take-over slack) as a slow database would',
  deadlineOnWallClock:
    'a worker measures its lease deadline on its wall clock (which steps), not a monotonic one',
  noStandbyWait: 'a claim is answered at its commit, before the standbys have flushed it',
  webhookNoStandbyWait:
    'a Stripe webhook (a meter error report) is answered 200 at its commit, before the standbys have flushed it: Stripe never sends it again',
  reportSparesUnsettled:
    "a meter error report fails only the rows already delivered or accepted: one that comes before the worker settles its call's answer changes nothing, and the settle then marks the rows delivered",
  randomIdentifiers: "a group's identifier is drawn at random, not derived from the rows it carries",
  settleStaleLease: 'settle applies the answers of a batch whose lease has run out',
  renewCountsLostKeys:
    "a renewal answers every key its batch ever leased, held or lost: the batch's deadline moves for a key reaped or taken meanwhile",
  reaperForgetsKeys:
    "the lease reaper frees a dead batch's leases and completes its jobs without queuing their keys: they wait for the sweep",
  reaperRequeuesRunningClaim:
    'the reaper requeues the jobs of a claim still running (it skips no locked key)',
  wrongIdentifierWindow:
    "a redrive restarts its groups' identifier window (identified_at set to the redrive's time): Stripe forgets an identifier 24 h after it first saw it",
  redriveLeavesLease:
    "a redrive resets a reported group's rows while a batch still holds its key: that batch's late settle applies its answer ('accepted') to them",
  coalesceFuture: 'a reading stamped in the future is grouped at once with the valid readings of its key',
  futureFails:
    'a destination\'s "timestamp in the future" counts as a failed attempt: the group is failed at its retry limit instead of retried until the timestamp is due',
  reportHourFromHostClock: "the hourly report's hour comes from the worker's wall clock, not the database's",
  billableWhileShadowing:
    'a period-boundary migration never makes the Metronome customer unbillable: the shadowed usage is invoiced by both',
  cutOverAtPeriodUnderWay:
    'a period-boundary migration cuts over at the end of the period under way when the parallel run starts, not of the first period it shadows whole',
  accessRefusalCounted:
    "a connected account's refusal of the platform's access is read as a server error: counted toward the group's retry limit, then failed",
  sweepCountsActiveBatchJob:
    "the sweep counts an active meter-delivery-batch job as covering its keys, a dead worker's too: the keys it had not reached wait for pg-boss to expire the job (15 minutes)",
} as const;

export type Mutation = keyof typeof MUTATIONS;

export const isMutation = (name: string): name is Mutation => Object.hasOwn(MUTATIONS, name);
