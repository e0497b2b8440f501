#include "kernels_common.cuh"

#ifndef PYINF_CUDA_ARCH_LIST
#define PYINF_CUDA_ARCH_LIST ""
#endif

extern "C" int pyinf_cuda_compiled(void) { return 1; }
extern "C" const char* pyinf_cuda_archs(void) { return PYINF_CUDA_ARCH_LIST; }

#if defined(PYINF_WITH_SM90)
extern "C" int pyinf_cuda_sm90_compiled(void) { return 1; }
#else
extern "C" int pyinf_cuda_sm90_compiled(void) { return 0; }
#endif
