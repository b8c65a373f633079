// Decodes Stripe's form encoding (`payload[stripe_customer_id]=cus_1&metadata[k]=v&expand[0]=x`)
// into nested objects, the way the stripe SDK encodes v1 request bodies and query strings.

export type FormValue = string | FormObject;
export interface FormObject {
  [key: string]: FormValue;
}

export function parseForm(text: string): FormObject {
  const root: FormObject = {};
  for (const [rawKey, value] of new URLSearchParams(text)) {
    const match = /^([^[\]]+)((?:\[[^[\]]*\])*)$/.exec(rawKey);
    const path = match
      ? [match[1]!, ...[...match[2]!.matchAll(/\[([^[\]]*)\]/g)].map((m) => m[1]!)]
      : [rawKey];
    let node = root;
    for (let i = 0; i < path.length - 1; i++) {
      const segment = path[i]!;
      const next = node[segment];
      if (typeof next === 'object') node = next;
      else {
        const created: FormObject = {};
        node[segment] = created;
        node = created;
      }
    }
    node[path[path.length - 1]!] = value;
  }
  return root;
}
