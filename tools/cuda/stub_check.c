/* tools/cuda/check_stubs.sh: calls through the lazy-loading stubs that need no GPU. */
#include <stdio.h>
#include <string.h>
#include <cudnn.h>
#include <nvrtc.h>
/* The CUDA runtime's registration entry point (not in a public header). */
extern void **__cudaRegisterFatBinary(void *fat_cubin);

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "soft") == 0) {
        /* Run without the libraries: registration must do nothing and return NULL. */
        void **handle = __cudaRegisterFatBinary(NULL);
        printf("soft %s\n", handle == NULL ? "ok" : "FAILED");
        return handle == NULL ? 0 : 1;
    }
    int maj = 0, min = 0;
    if (nvrtcVersion(&maj, &min) != NVRTC_SUCCESS) { puts("nvrtcVersion failed"); return 1; }
    printf("nvrtc %d.%d\n", maj, min);
    nvrtcProgram prog;
    const char *src = "extern \"C\" __global__ void k(float *x) { x[threadIdx.x] *= 2.0f; }";
    if (nvrtcCreateProgram(&prog, src, "k.cu", 0, NULL, NULL) != NVRTC_SUCCESS) return 1;
    const char *opts[] = {"--gpu-architecture=compute_80"};
    if (nvrtcCompileProgram(prog, 1, opts) != NVRTC_SUCCESS) { puts("compile failed"); return 1; }
    size_t n = 0; nvrtcGetPTXSize(prog, &n); printf("ptx %zu bytes\n", n);
    printf("cudnn %zu\n", cudnnGetVersion());
    cudnnTensorDescriptor_t d; if (cudnnCreateTensorDescriptor(&d)) { puts("cudnn create failed"); return 1; }
    if (cudnnSetTensor4dDescriptorEx(d, CUDNN_DATA_FLOAT, 2, 3, 5, 7, 105, 35, 7, 1)) { puts("set failed"); return 1; }
    cudnnDataType_t t; int a[8];
    cudnnGetTensor4dDescriptor(d, &t, a, a+1, a+2, a+3, a+4, a+5, a+6, a+7);
    printf("desc %d %d %d %d %d %d %d %d\n", a[0],a[1],a[2],a[3],a[4],a[5],a[6],a[7]);
    cudnnActivationDescriptor_t ad; cudnnCreateActivationDescriptor(&ad);
    cudnnSetActivationDescriptor(ad, CUDNN_ACTIVATION_CLIPPED_RELU, CUDNN_PROPAGATE_NAN, 6.25);
    cudnnActivationMode_t m; cudnnNanPropagation_t np; double coef = 0;
    cudnnGetActivationDescriptor(ad, &m, &np, &coef); printf("coef %g\n", coef);
    return 0;
}
