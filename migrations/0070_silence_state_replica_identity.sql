-- silence_state has no primary key (its key, (organization_id, sensor_id) with NULLS NOT DISTINCT, has a
-- nullable column), so logical replication cannot identify its rows, and Citus moves a reference table's
-- placements onto a new node with logical replication: a rebalance onto a third worker failed with "cannot
-- use logical replication to transfer shards of the relation silence_state". FULL identifies a row by all
-- its columns: the table holds one row per silent organization or sensor, so the cost is nothing. Citus
-- propagates the setting to every placement.
ALTER TABLE silence_state REPLICA IDENTITY FULL;
