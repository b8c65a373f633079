// Reading Postgres plans (EXPLAIN (ANALYZE, FORMAT JSON)) in the plan tests: how many rows a plan
// handled, whatever its shape, so a test can bound work that grows with the square of a batch or
// with the whole table rather than with the batch.

/** A node of EXPLAIN (ANALYZE, FORMAT JSON)'s plan, with the fields the plan tests read. */
export interface PlanNode {
  'Node Type': string;
  'Relation Name'?: string;
  'Index Name'?: string;
  'Actual Rows'?: number;
  'Actual Loops'?: number;
  'Rows Removed by Join Filter'?: number;
  'Rows Removed by Filter'?: number;
  'Index Cond'?: string;
  /** A CTE's or sub-select's plan: "CTE name", "SubPlan 1". */
  'Subplan Name'?: string;
  Plans?: PlanNode[];
}

const sumOver = (node: PlanNode, own: (n: PlanNode) => number): number =>
  own(node) + (node.Plans ?? []).reduce((sum, child) => sum + sumOver(child, own), 0);

/** Rows the plan's joins produced or threw away, and rows its scans read and threw away, all loops. */
export function rowsHandled(node: PlanNode): number {
  return sumOver(node, (n) => {
    const loops = n['Actual Loops'] ?? 1;
    return (
      (n['Rows Removed by Join Filter'] ?? 0) +
      (n['Rows Removed by Filter'] ?? 0) * loops +
      (/Join|Nested Loop/.test(n['Node Type']) ? (n['Actual Rows'] ?? 0) * loops : 0)
    );
  });
}

/** Rows the plan's scans read and threw away by a filter, over all their loops. */
export function removedByFilters(node: PlanNode): number {
  return sumOver(node, (n) => (n['Rows Removed by Filter'] ?? 0) * (n['Actual Loops'] ?? 1));
}

/** Rows the plan's join filters threw away (as EXPLAIN reports them). */
export function removedByJoinFilters(node: PlanNode): number {
  return sumOver(node, (n) => n['Rows Removed by Join Filter'] ?? 0);
}

/** The indexes the plan read, in plan order. */
export function indexesRead(node: PlanNode): string[] {
  return [...(node['Index Name'] ? [node['Index Name']] : []), ...(node.Plans ?? []).flatMap(indexesRead)];
}

/**
 * Elements of array constants (`= ANY ('{...}')`) in the plan's index conditions, times the loops that
 * searched them: PostgreSQL prepares such an array on every rescan, so a look-up per key that carries
 * the batch's list costs keys × list (quadratic), where one search of the list costs the list once.
 */
export function arrayElementsSearched(node: PlanNode): number {
  return sumOver(node, (n) => {
    const arrays = [...(n['Index Cond'] ?? '').matchAll(/ANY \('\{([^}]*)\}'/g)];
    const elements = arrays.reduce((sum, m) => sum + (m[1] === '' ? 0 : m[1]!.split(',').length), 0);
    return elements * (n['Actual Loops'] ?? 1);
  });
}

/** Rows the plan's scans read (returned or thrown away by a filter), over all their loops. */
export function rowsScanned(node: PlanNode): number {
  return sumOver(node, (n) =>
    /Scan/.test(n['Node Type']) && n['Relation Name'] !== undefined
      ? ((n['Actual Rows'] ?? 0) + (n['Rows Removed by Filter'] ?? 0)) * (n['Actual Loops'] ?? 1)
      : 0,
  );
}
