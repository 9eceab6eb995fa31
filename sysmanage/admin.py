"""Admin registration of the user model."""

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from sysmanage.models import User

admin.site.register(User, UserAdmin)
admin.site.site_header = "SysManage administration"
admin.site.site_title = "SysManage"
