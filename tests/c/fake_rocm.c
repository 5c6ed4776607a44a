/*
 * Stand-in for the ROCm runtime, for tests only: exports the handful of HIP and HSA entry
 * points the plugin loads, backed by host memory. The root build script links it into
 * $OUT_DIR/fake-rocm/libfake-rocm.so with libamdhip64.so and libhsa-runtime64.so.1 as symlinks,
 * so both names load one copy (one allocation table). Tests select it with LD_LIBRARY_PATH.
 *
 * - hipMalloc: page-aligned anonymous mmap, remembered as "device" memory of GPU 0.
 * - hipPointerGetAttributes: type Device (2) for those ranges, Unregistered (0) elsewhere.
 * - HSA: one CPU agent and one GPU agent named gfx1151.
 * - hsa_amd_portable_export_dmabuf: FAKE_ROCM_DMABUF=memfd returns a memfd of the allocation's
 *   size and the offset of the address in it; anything else (default "fail") fails with
 *   HSA_STATUS_ERROR (0x1000) and FAKE_ROCM_DMABUF_SUPPORTED reports false.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_ALLOCS 256

typedef struct {
    int type;
    int device;
    void *devicePointer;
    void *hostPointer;
    int isManaged;
    unsigned allocationFlags;
} fake_pointer_attribute;

typedef struct {
    uint64_t handle;
} fake_agent;

static struct {
    uintptr_t base;
    size_t len;
} allocs[MAX_ALLOCS];

static int find_alloc(const void *p) {
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].len && a >= allocs[i].base && a < allocs[i].base + allocs[i].len)
            return i;
    return -1;
}

static bool memfd_mode(void) {
    const char *m = getenv("FAKE_ROCM_DMABUF");
    return m && strcmp(m, "memfd") == 0;
}

int hipRuntimeGetVersion(int *v) {
    *v = 70000000;
    return 0;
}

int hipMalloc(void **p, size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = (n + page - 1) / page * page;
    if (len == 0)
        len = page;
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].len == 0) {
            void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED)
                return 2; /* hipErrorOutOfMemory */
            allocs[i].base = (uintptr_t)m;
            allocs[i].len = len;
            *p = m;
            return 0;
        }
    }
    return 2;
}

int hipFree(void *p) {
    int i = find_alloc(p);
    if (i < 0 || allocs[i].base != (uintptr_t)p)
        return 1; /* hipErrorInvalidValue */
    munmap(p, allocs[i].len);
    allocs[i].len = 0;
    return 0;
}

int hipPointerGetAttributes(fake_pointer_attribute *a, const void *p) {
    memset(a, 0, sizeof *a);
    a->device = -1;
    if (find_alloc(p) >= 0) {
        a->type = 2;
        a->device = 0;
        a->devicePointer = (void *)p;
    }
    return 0;
}

int hsa_init(void) { return 0; }

typedef int (*agent_cb)(fake_agent, void *);

int hsa_iterate_agents(agent_cb cb, void *data) {
    for (uint64_t h = 1; h <= 2; h++) {
        int st = cb((fake_agent){h}, data);
        if (st != 0)
            return st;
    }
    return 0;
}

int hsa_agent_get_info(fake_agent agent, int attr, void *value) {
    if (attr == 0) { /* HSA_AGENT_INFO_NAME, char[64] */
        memset(value, 0, 64);
        strcpy((char *)value, agent.handle == 2 ? "gfx1151" : "fake-cpu");
        return 0;
    }
    if (attr == 17) { /* HSA_AGENT_INFO_DEVICE */
        *(int *)value = agent.handle == 2 ? 1 : 0;
        return 0;
    }
    return 0x1001; /* HSA_STATUS_ERROR_INVALID_ARGUMENT */
}

int hsa_system_get_info(int attr, void *value) {
    if (attr == 0x204) { /* HSA_AMD_SYSTEM_INFO_DMABUF_SUPPORTED */
        *(bool *)value = memfd_mode();
        return 0;
    }
    return 0x1001;
}

int hsa_amd_portable_export_dmabuf(const void *ptr, size_t size, int *fd, uint64_t *offset) {
    int i = find_alloc(ptr);
    if (!memfd_mode() || i < 0 || (uintptr_t)ptr + size > allocs[i].base + allocs[i].len)
        return 0x1000; /* HSA_STATUS_ERROR */
    int m = memfd_create("fake-rocm-dmabuf", MFD_CLOEXEC);
    if (m < 0)
        return 0x1000;
    if (ftruncate(m, (off_t)allocs[i].len) != 0) {
        close(m);
        return 0x1000;
    }
    *fd = m;
    *offset = (uintptr_t)ptr - allocs[i].base;
    return 0;
}

int hsa_amd_portable_close_dmabuf(int fd) { return close(fd) == 0 ? 0 : 0x1001; }
