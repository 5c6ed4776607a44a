/*
 * Stand-in for the ROCm runtime, for tests only: exports the handful of HIP and HSA entry
 * points the plugin loads, backed by host memory. The root build script links it into
 * $OUT_DIR/fake-rocm/libfake-rocm.so with libamdhip64.so and libhsa-runtime64.so.1 as symlinks,
 * so both names load one copy (one allocation table). Tests select it with LD_LIBRARY_PATH.
 * It also builds a second copy with another identity (FAKE_ROCM_HIP_VERSION,
 * FAKE_ROCM_GPU_NAME) under a wheel-style file name, as a Python package bundles its runtime.
 *
 * - hipMalloc: pages of a memfd (shmem, sealed against shrinking) mapped shared, remembered as
 *   "device" memory of GPU 0; the memfd stays open until hipFree, as a driver keeps its buffer
 *   object.
 * - hipPointerGetAttributes: type Device (2) for those ranges, Unregistered (0) elsewhere.
 * - HSA: one CPU agent and one GPU agent named FAKE_ROCM_GPU_NAME (default gfx1151).
 * - hsa_amd_portable_export_dmabuf exports the whole allocation holding the range and returns
 *   the range's offset in it. FAKE_ROCM_DMABUF selects how:
 *     export   a real dma-buf of the allocation's pages through /dev/udmabuf where that device
 *              exists, else a descriptor of the allocation's memfd (the same pages);
 *     udmabuf  a real dma-buf only: fails without /dev/udmabuf;
 *     memfd    the allocation's memfd;
 *     anything else (default "fail") fails with HSA_STATUS_ERROR (0x1000), and
 *     HSA_AMD_SYSTEM_INFO_DMABUF_SUPPORTED then reports false.
 *   Either way the descriptor refers to the buffer's own pages: a second mapping of it shows
 *   the bytes written through the hipMalloc pointer.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/udmabuf.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef FAKE_ROCM_HIP_VERSION
#define FAKE_ROCM_HIP_VERSION 70000000
#endif
#ifndef FAKE_ROCM_GPU_NAME
#define FAKE_ROCM_GPU_NAME "gfx1151"
#endif

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
    int memfd;
} allocs[MAX_ALLOCS];

static int find_alloc(const void *p) {
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].len && a >= allocs[i].base && a < allocs[i].base + allocs[i].len)
            return i;
    return -1;
}

typedef enum { EXPORT_FAIL, EXPORT_ANY, EXPORT_UDMABUF, EXPORT_MEMFD } export_mode;

static export_mode dmabuf_mode(void) {
    const char *m = getenv("FAKE_ROCM_DMABUF");
    if (!m)
        return EXPORT_FAIL;
    if (strcmp(m, "export") == 0)
        return EXPORT_ANY;
    if (strcmp(m, "udmabuf") == 0)
        return EXPORT_UDMABUF;
    if (strcmp(m, "memfd") == 0)
        return EXPORT_MEMFD;
    return EXPORT_FAIL;
}

int hipRuntimeGetVersion(int *v) {
    *v = FAKE_ROCM_HIP_VERSION;
    return 0;
}

int hipMalloc(void **p, size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = (n + page - 1) / page * page;
    if (len == 0)
        len = page;
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].len == 0) {
            int fd = memfd_create("fake-rocm-vram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
            if (fd < 0)
                return 2; /* hipErrorOutOfMemory */
            /* udmabuf takes only memfds that cannot shrink under it. */
            if (ftruncate(fd, (off_t)len) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
                close(fd);
                return 2;
            }
            void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (m == MAP_FAILED) {
                close(fd);
                return 2;
            }
            allocs[i].base = (uintptr_t)m;
            allocs[i].len = len;
            allocs[i].memfd = fd;
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
    close(allocs[i].memfd);
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
        strcpy((char *)value, agent.handle == 2 ? FAKE_ROCM_GPU_NAME : "fake-cpu");
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
        *(bool *)value = dmabuf_mode() != EXPORT_FAIL;
        return 0;
    }
    return 0x1001;
}

/* A dma-buf of the whole allocation `i`, or -1 (no /dev/udmabuf, or the kernel refused). */
static int udmabuf_export(int i) {
    int dev = open("/dev/udmabuf", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -1;
    struct udmabuf_create c = {
        .memfd = (uint32_t)allocs[i].memfd,
        .flags = UDMABUF_FLAGS_CLOEXEC,
        .offset = 0,
        .size = allocs[i].len,
    };
    int fd = ioctl(dev, UDMABUF_CREATE, &c);
    close(dev);
    return fd;
}

int hsa_amd_portable_export_dmabuf(const void *ptr, size_t size, int *fd, uint64_t *offset) {
    int i = find_alloc(ptr);
    export_mode mode = dmabuf_mode();
    if (mode == EXPORT_FAIL || i < 0 || (uintptr_t)ptr + size > allocs[i].base + allocs[i].len)
        return 0x1000; /* HSA_STATUS_ERROR */
    int out = -1;
    if (mode == EXPORT_ANY || mode == EXPORT_UDMABUF)
        out = udmabuf_export(i);
    if (out < 0 && mode != EXPORT_UDMABUF)
        out = fcntl(allocs[i].memfd, F_DUPFD_CLOEXEC, 0);
    if (out < 0)
        return 0x1000;
    *fd = out;
    *offset = (uintptr_t)ptr - allocs[i].base;
    return 0;
}

int hsa_amd_portable_close_dmabuf(int fd) { return close(fd) == 0 ? 0 : 0x1001; }
