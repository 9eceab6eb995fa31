"""Group memberships go with their host or key in the database itself (PostgreSQL).

While an upgrade's migrations have run and the previous release still serves, that
release deletes hosts and registration keys without knowing the membership tables:
Django deletes a many-to-many row itself, so without a cascade in the database the
previous release's delete of a grouped host failed on the foreign key.  SQLite serves
one process, which is stopped for an upgrade (docs/operations.md, "Upgrades").
"""

from django.db import migrations

CASCADE = """
DO $$
DECLARE r record;
BEGIN
  FOR r IN
    SELECT con.conname, rel.relname AS tab, att.attname AS col, frel.relname AS ref
    FROM pg_constraint con
    JOIN pg_class rel ON rel.oid = con.conrelid
    JOIN pg_class frel ON frel.oid = con.confrelid
    JOIN pg_attribute att ON att.attrelid = con.conrelid AND att.attnum = con.conkey[1]
    WHERE con.contype = 'f'
      AND rel.relname IN ('hosts_host_groups', 'hosts_registrationkey_groups')
      AND att.attname IN ('host_id', 'registrationkey_id')
  LOOP
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', r.tab, r.conname);
    EXECUTE format(
      'ALTER TABLE %I ADD CONSTRAINT %I FOREIGN KEY (%I) REFERENCES %I (id) '
      'ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED',
      r.tab, r.conname, r.col, r.ref);
  END LOOP;
END $$;
"""


def cascade(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CASCADE, params=None)  # no placeholders: %I is format()'s


class Migration(migrations.Migration):
    dependencies = [
        ("hosts", "0009_host_groups"),
    ]

    operations = [
        migrations.RunPython(cascade, migrations.RunPython.noop, elidable=False),
    ]
