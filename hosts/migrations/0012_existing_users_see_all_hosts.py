"""Users who existed before host visibility was scoped keep seeing every host.

From here on a user without staff status sees only the hosts of the groups granted to
them, unless they hold ``hosts.view_all_hosts``; this gives that permission to every
user already there who is not staff (staff see every host anyway), so that an upgrade
changes nothing anyone sees.  Users created later start with no host in sight.
"""

from django.conf import settings
from django.db import migrations


def grant_existing(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    users = User.objects.filter(is_staff=False, is_superuser=False)
    if not users.exists():
        return
    content_type, _ = ContentType.objects.get_or_create(app_label="hosts", model="host")
    permission, _ = Permission.objects.get_or_create(
        content_type=content_type,
        codename="view_all_hosts",
        defaults={"name": "Can see every host"},
    )
    permission.user_set.add(*users)


class Migration(migrations.Migration):
    dependencies = [
        ("hosts", "0011_host_group_grants"),
        ("auth", "0012_alter_user_first_name_max_length"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(grant_existing, migrations.RunPython.noop)]
