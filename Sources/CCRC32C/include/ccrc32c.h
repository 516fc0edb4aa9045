#ifndef WARRANT_CCRC32C_H
#define WARRANT_CCRC32C_H

#include <stddef.h>
#include <stdint.h>

/// 1 if this CPU computes CRC-32C in one instruction (x86-64 with SSE4.2,
/// or AArch64 with the CRC extension), else 0.
int warrant_crc32c_hardware(void);

/// Continues a CRC-32C whose running state (not yet inverted at the end)
/// is `state` over `length` bytes, with the CPU's instruction. Call only
/// when warrant_crc32c_hardware() returned 1.
uint32_t warrant_crc32c_update(uint32_t state, const void *bytes, size_t length);

#endif
