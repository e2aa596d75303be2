/* Wine 8 (Debian 12) lacks bcryptprimitives.dll, whose ProcessPrng Rust's
 * standard library calls for random seeds since 1.78. This stand-in serves
 * it from RtlGenRandom so that test binaries start under that Wine; it is
 * used by scripts/wine-test.sh only and never shipped. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG len);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, n))
            return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
