// Checks environments against the real @mockoon/commons (tests/test_mockoon_schema_interop.py).
//
// Reads a JSON array of environments (from the file named by the first argument, or stdin) and
// writes a JSON array with, for each: the errors of EnvironmentSchemaNoFix (Mockoon's strict
// schema, the one that repairs nothing, which `mockoon-cli validate` uses), also with Joi's
// type conversions off, whether repairRefs changed anything in a copy, and the
// uuids that occur more than once (environment, routes, responses, folders, data, callbacks).
// Exit 0 when every environment passes, 1 when one does not, 2 on bad input.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { isDeepStrictEqual } from 'node:util';

const require = createRequire(import.meta.url);
const { EnvironmentSchemaNoFix, repairRefs } = require('@mockoon/commons');

function duplicateUuids(env) {
  const seen = new Map();
  const add = (uuid, where) => {
    if (typeof uuid !== 'string') return;
    seen.set(uuid, [...(seen.get(uuid) || []), where]);
  };
  add(env.uuid, 'environment');
  for (const key of ['routes', 'folders', 'data', 'callbacks']) {
    (Array.isArray(env[key]) ? env[key] : []).forEach((e, i) => {
      add(e && e.uuid, `${key}[${i}]`);
      if (key === 'routes' && e && Array.isArray(e.responses)) {
        e.responses.forEach((r, j) => add(r && r.uuid, `routes[${i}].responses[${j}]`));
      }
    });
  }
  return [...seen.entries()].filter(([, w]) => w.length > 1).map(([u, w]) => `${u}: ${w.join(', ')}`);
}

function check(env) {
  const out = { schemaErrors: [], refsRepaired: false, duplicateUuids: [], crash: null };
  try {
    // as `mockoon-cli validate` runs it, then without Joi's conversions (a port "3000" passes
    // the first, as Joi converts it to a number for the check, but is a string in the file)
    const seen = new Set();
    for (const [prefix, options] of [['', {}], ['unconverted ', { convert: false }]]) {
      const { error } = EnvironmentSchemaNoFix.validate(env, { abortEarly: false, ...options });
      for (const d of error ? error.details : []) {
        const message = `${d.path.join('.')}: ${d.message}`;
        if (!seen.has(message)) out.schemaErrors.push(prefix + message);
        seen.add(message);
      }
    }
  } catch (e) {
    out.crash = `validate: ${e}`;
  }
  try {
    const copy = structuredClone(env);
    repairRefs(copy);
    out.refsRepaired = !isDeepStrictEqual(copy, env);
  } catch (e) {
    out.crash = `repairRefs: ${e}`;
  }
  try {
    out.duplicateUuids = duplicateUuids(env);
  } catch (e) {
    out.crash = `uuids: ${e}`;
  }
  out.ok = !out.schemaErrors.length && !out.refsRepaired && !out.duplicateUuids.length && !out.crash;
  return out;
}

let input;
try {
  input = JSON.parse(readFileSync(process.argv[2] || 0, 'utf8'));
} catch (e) {
  process.stderr.write(`validate_env: cannot read a JSON array: ${e}\n`);
  process.exit(2);
}
if (!Array.isArray(input)) {
  process.stderr.write('validate_env: the input must be a JSON array of environments\n');
  process.exit(2);
}
const results = input.map(check);
process.stdout.write(JSON.stringify(results) + '\n');
process.exit(results.every((r) => r.ok) ? 0 : 1);
